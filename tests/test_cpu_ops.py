"""The C kernels as registered ops (``kernels/cpu_ops.py``): ``torch.library.opcheck`` of each
(schema with its declared pool mutation, fake implementation, AOT dispatch with dynamic shapes);
the step and pool ops over permuted rows equal the references and leave other rows untouched;
a graph traced by torch.compile calls them exactly where an eager call takes the C kernels (no
gradient; not under torch.export, whose graphs stay pure PyTorch)."""

import subprocess
import sys

import pytest
import torch
import torch._dynamo.testing

from streamssm.kernels import conv1d_step, cpu_ops, load_cpu_kernels, selective_scan_step, ssd_scan_pool
from streamssm.kernels.conv1d.reference import causal_conv1d_ref
from streamssm.kernels.mamba1.reference import selective_scan_ref
from streamssm.models import ModelConfig, SSMModel
from streamssm.testing import PARITY_FP32, assert_close

pytestmark = pytest.mark.skipif(not load_cpu_kernels(), reason="no C++ compiler builds the CPU kernels here")

POOL, ROWS = 6, [4, 0, 2]  # permuted rows of a larger pool: no slice of it


def randn(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def conv_step_case(gen: torch.Generator) -> dict:
    b, d, w = len(ROWS), 32, 4
    return dict(x=randn(b, 2 * d, gen=gen)[:, :d], conv_state=randn(POOL, d, w - 1, gen=gen),  # x: a split's view
                weight=randn(d, w, gen=gen), bias=randn(d, gen=gen), activation="silu", rows=torch.tensor(ROWS))


def mamba1_step_case(gen: torch.Generator, groups: int = 2) -> dict:
    b, d, n = len(ROWS), 32, 16
    return dict(ssm_state=randn(POOL, d, n, gen=gen), u=randn(b, d, gen=gen), delta=randn(b, d, gen=gen),
                A=-torch.rand(d, n, generator=gen) - 0.1, B=randn(b, groups, n, gen=gen),
                C=randn(b, groups, n, gen=gen),
                D=randn(d, gen=gen), z=randn(b, d, gen=gen), delta_bias=randn(d, gen=gen), delta_softplus=True,
                rows=torch.tensor(ROWS))


def ssd_pool_case(gen: torch.Generator, length: int = 5) -> dict:
    b, h, p, n, g = len(ROWS), 4, 8, 16, 2
    return dict(ssm_state=randn(POOL, h, p, n, gen=gen), x=randn(b, length, h, p, gen=gen),
                dt=randn(b, length, h, gen=gen), A=-torch.rand(h, generator=gen) - 0.1,
                B=randn(b, length, g, n, gen=gen), C=randn(b, length, g, n, gen=gen), D=randn(h, gen=gen),
                z=randn(b, length, h, p, gen=gen), dt_bias=randn(h, gen=gen), dt_softplus=True,
                rows=torch.tensor(ROWS))


def conv_case(gen: torch.Generator) -> dict:
    b, d, l, w = 2, 32, 7, 4
    return dict(x=randn(b, l, d, gen=gen).transpose(1, 2), weight=randn(d, w, gen=gen), bias=randn(d, gen=gen),
                initial_state=randn(b, d, w - 1, gen=gen), activation="silu")


def mamba1_scan_case(gen: torch.Generator) -> dict:
    b, d, n, l = 2, 32, 16, 7
    return dict(u=randn(b, d, l, gen=gen), delta=randn(b, d, l, gen=gen), A=-torch.rand(d, n, generator=gen) - 0.1,
                B=randn(b, 2, n, l, gen=gen), C=randn(b, 2, n, l, gen=gen), D=randn(d, gen=gen),
                z=randn(b, d, l, gen=gen), delta_bias=randn(d, gen=gen), delta_softplus=True,
                initial_state=randn(b, d, n, gen=gen))


CASES = {"conv1d_step_cpu": conv_step_case, "selective_scan_step_cpu": mamba1_step_case,
         "ssd_scan_pool_cpu": ssd_pool_case, "causal_conv1d_cpu": conv_case, "selective_scan_cpu": mamba1_scan_case}


@pytest.mark.parametrize("name", CASES)
def test_opcheck(name):
    kwargs = CASES[name](torch.Generator().manual_seed(0))
    torch.library.opcheck(getattr(torch.ops.streamssm, name).default, (), kwargs)


def check_pool(name: str, before: torch.Tensor, want: torch.Tensor, got: torch.Tensor) -> None:
    """got and want (the pool after the op and after the reference) match at ROWS; other rows unchanged."""
    rtol, atol = PARITY_FP32
    assert_close(f"{name} pool rows", want[ROWS], got[ROWS], rtol=rtol, atol=atol)
    others = [r for r in range(POOL) if r not in ROWS]
    assert torch.equal(got[others], before[others]), f"{name}: rows outside `rows` changed"


def test_conv1d_step_op_equals_reference():
    case = conv_step_case(torch.Generator().manual_seed(1))
    pool = case["conv_state"]
    ref_pool, op_pool = pool.clone(), pool.clone()
    want = conv1d_step(case["x"], ref_pool, case["weight"], case["bias"], "silu", state_indices=case["rows"],
                       backend="reference")
    got = cpu_ops.conv1d_step_cpu(**case | dict(conv_state=op_pool))
    assert_close("conv1d_step_cpu y", want, got, rtol=PARITY_FP32[0], atol=PARITY_FP32[1])
    check_pool("conv1d_step_cpu", pool, ref_pool, op_pool)


def check_pool_op_against_reference(name: str, case: dict, reference, op) -> None:
    """``op(pool, rows, inputs)`` and ``reference(pool, rows, inputs)`` on clones of the case's
    ssm_state pool: equal outputs, and equal pools with the rows not stepped untouched."""
    pool, rows = case.pop("ssm_state"), case.pop("rows")
    ref_pool, op_pool = pool.clone(), pool.clone()
    want, got = reference(ref_pool, rows, case), op(op_pool, rows, case)
    assert_close(f"{name} y", want, got, rtol=PARITY_FP32[0], atol=PARITY_FP32[1])
    check_pool(name, pool, ref_pool, op_pool)


@pytest.mark.parametrize("groups", [1, 2])
def test_selective_scan_step_op_equals_reference(groups):
    check_pool_op_against_reference(
        "selective_scan_step_cpu", mamba1_step_case(torch.Generator().manual_seed(2), groups),
        lambda pool, rows, c: selective_scan_step(pool, **c, state_indices=rows, backend="reference"),
        lambda pool, rows, c: cpu_ops.selective_scan_step_cpu(pool, **c, rows=rows))


@pytest.mark.parametrize("length", [1, 5])
def test_ssd_scan_pool_op_equals_reference(length):
    check_pool_op_against_reference(
        "ssd_scan_pool_cpu", ssd_pool_case(torch.Generator().manual_seed(3), length),
        lambda pool, rows, c: ssd_scan_pool(pool, **c, chunk_size=4, state_indices=rows, backend="reference"),
        lambda pool, rows, c: cpu_ops.ssd_scan_pool_cpu(pool, **c, rows=rows))


def test_chunk_ops_equal_references():
    rtol, atol = PARITY_FP32
    case = conv_case(torch.Generator().manual_seed(4))
    want_y, want_final = causal_conv1d_ref(**case, return_final_state=True)
    got_y, got_final = cpu_ops.causal_conv1d_op(**case, return_final_state=True)
    assert_close("causal_conv1d_cpu y", want_y, got_y, rtol=rtol, atol=atol)
    assert_close("causal_conv1d_cpu final", want_final, got_final, rtol=rtol, atol=atol)
    case = mamba1_scan_case(torch.Generator().manual_seed(5))
    want_y, want_final = selective_scan_ref(**case, return_final_state=True)
    got_y, got_final = cpu_ops.selective_scan_op(**case, return_final_state=True)
    assert_close("selective_scan_cpu y", want_y, got_y, rtol=rtol, atol=atol)
    assert_close("selective_scan_cpu final", want_final, got_final, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- what traced graphs call


def model(block: str) -> SSMModel:
    """A small model whose every layer suits the C kernels (Mamba-1's step: d and n multiples of 16)."""
    torch.manual_seed(0)
    return SSMModel(ModelConfig(block=block, d_model=16, n_layers=2, d_state=16, headdim=8, chunk_size=4,
                                input_kind="continuous", input_dim=3, head="regression", output_dim=2)).eval()


def traced_ops(m: SSMModel, length: int) -> list[str]:
    """The streamssm ops in the graph torch.compile traces of the engine's call (pool step or
    chunk over pool rows), no gradient."""
    pool = m.init_state(4)
    graphs = torch._dynamo.testing.EagerAndRecordGraphs()
    call = torch.compile(lambda x, rows: m.backbone.forward_pool(x, pool, rows) if length > 1
                         else m.backbone.step_pool(x[:, 0], pool, rows), backend=graphs, fullgraph=True)
    with torch.no_grad():
        call(torch.randn(3, length, 16), torch.tensor([2, 0, 1]))
    return [str(node.target).removesuffix(".default") for g in graphs.graphs for node in g.graph.nodes
            if "streamssm" in str(node.target)]


EXPECTED = {("mamba", 1): ["conv1d_step_cpu", "selective_scan_step_cpu"],
            ("mamba2", 1): ["conv1d_step_cpu", "ssd_scan_pool_cpu"],
            ("mamba", 5): ["causal_conv1d_cpu", "selective_scan_cpu"],
            ("mamba2", 5): ["causal_conv1d_cpu", "ssd_scan_pool_cpu"]}


@pytest.mark.parametrize(("block", "length"), EXPECTED, ids=[f"{b}-l{n}" for b, n in EXPECTED])
def test_traced_calls_take_the_c_ops(block, length):
    torch._dynamo.reset()
    ops = traced_ops(model(block), length)
    assert ops == [f"streamssm.{name}" for name in EXPECTED[block, length]] * 2  # two layers


def test_traced_calls_with_gradients_take_no_c_op():
    m = model("mamba2")
    pool = m.init_state(4)
    graphs = torch._dynamo.testing.EagerAndRecordGraphs()
    torch._dynamo.reset()
    torch.compile(lambda x, rows: m.backbone.step_pool(x, pool, rows), backend=graphs, fullgraph=True)(
        torch.randn(3, 16), torch.tensor([2, 0, 1]))
    assert not any("streamssm" in str(node.target) for g in graphs.graphs for node in g.graph.nodes)


def test_exported_graphs_take_no_c_op():
    """torch.export (non-strict, its default) traces the references even without gradients: the
    ONNX export converts its graphs."""

    class Step(torch.nn.Module):
        def __init__(self, m: SSMModel):
            super().__init__()
            self.m = m

        def forward(self, x: torch.Tensor, conv: torch.Tensor, ssm: torch.Tensor) -> torch.Tensor:
            layer = self.m.backbone.layers[0].mixer
            return layer.step_pool(x, type(self.m.init_state(1)[0])(conv, ssm))

    m = model("mamba2")
    state = m.init_state(2)[0]
    with torch.no_grad():
        program = torch.export.export(Step(m), (torch.randn(2, 16), state.conv.clone(), state.ssm.clone()))
    assert not any("streamssm" in str(node.target) for node in program.graph.nodes)


@pytest.mark.parametrize("op, make_case, pool_name", [
    (cpu_ops.conv1d_step_cpu, conv_step_case, "conv_state"),
    (cpu_ops.selective_scan_step_cpu, mamba1_step_case, "ssm_state"),
    (cpu_ops.ssd_scan_pool_cpu, ssd_pool_case, "ssm_state")], ids=["conv_step", "mamba1_step", "ssd_pool"])
def test_int32_rows_equal_int64_rows(op, make_case, pool_name):
    """The C kernels take pool rows of any integer dtype (converted to int64 and held for the call)."""
    case = make_case(torch.Generator().manual_seed(4))
    pool = case.pop(pool_name)
    runs = []
    for dtype in (torch.int64, torch.int32):
        state = pool.clone()
        runs.append((op(**case | {pool_name: state, "rows": case["rows"].to(dtype)}), state))
    (y64, pool64), (y32, pool32) = runs
    assert torch.equal(y64, y32) and torch.equal(pool64, pool32)


def test_the_eager_path_does_not_import_dynamo():
    """Marking the library check constant for torch.compile must not import torch._dynamo (1.1-1.8 s
    and ~100k objects) into every process that runs the C kernels: the service benchmark's clients
    stalled 0.1-0.15 s in full collections of them (2026-12-07)."""
    code = ("import sys, torch; import streamssm.inference, streamssm.service.client; "
            "from streamssm.kernels import cpu_library; from streamssm.kernels.ssd import scan_cpu; "
            "assert scan_cpu.applies(torch.zeros(2, 3)) == (scan_cpu.library() is not None); "
            "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
