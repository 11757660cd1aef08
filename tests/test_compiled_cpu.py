"""The compiled CPU engine (streamssm.compiled_cpu): outputs, scores and carried states equal the
eager engine's across random chunkings and stream churn, for Mamba, Mamba-2 and a hybrid; its
programs call the C kernels' ops (kernels/cpu_ops.py), one program for every chunk length;
compiling up front touches no stream; without a C++ compiler the Streamer warns and runs eager."""

import logging
from collections import Counter
from pathlib import Path

import pytest
import torch
from test_engines import MODELS, VOCAB, assert_same, run_churn, tiny

from streamssm import compiled_cpu
from streamssm.compiled_cpu import CompiledCalls, compiler_problem
from streamssm.engine import resolve_engine
from streamssm.errors import ConfigError
from streamssm.inference import Streamer
from streamssm.kernels import cpu_library
from streamssm.models import ModelConfig, SSMModel
from streamssm.testing import PARITY_FP32, assert_close

needs_compiler = pytest.mark.skipif(compiler_problem() is not None, reason=f"no C++ compiler: {compiler_problem()}")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch (no graphs or recompile counts left by another model)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def n16(name: str) -> SSMModel:
    """``tiny(name)`` with d_state 16: every C kernel applies (Mamba-1's step needs n % 16 == 0;
    tiny's d_state 8 takes the references, eager and traced alike)."""
    torch.manual_seed(0)
    fields = dict(d_model=16, n_layers=2, d_state=16, headdim=8, chunk_size=4) | MODELS[name]
    return SSMModel(ModelConfig(**fields)).eval()


MODEL_MAKERS = {"mamba-lm": tiny, "mamba2-lm": tiny, "hybrid-classifier": tiny,
                "mamba-lm-n16": lambda _: n16("mamba-lm"), "mamba2-lm-n16": lambda _: n16("mamba2-lm")}


@needs_compiler
@pytest.mark.parametrize("name", MODEL_MAKERS)
def test_compiled_equals_eager_under_churn(name):
    eager = Streamer(MODEL_MAKERS[name](name), capacity=4)
    compiled = Streamer(MODEL_MAKERS[name](name), capacity=4, engine="compiled")
    assert isinstance(compiled._calls, CompiledCalls)
    assert_same(run_churn(eager, seed=5, rounds=10), run_churn(compiled, seed=5, rounds=10))
    assert compiled_graphs() > 0, "nothing was compiled: the calls ran eagerly"
    rtol, atol = PARITY_FP32
    for i, (want, got) in enumerate(zip(eager.pool, compiled.pool)):  # the carried states, stream rows
        for field, a, b in zip(want._fields, want, got):
            assert_close(f"layer {i} {field}", a[:4], b[:4], rtol=rtol, atol=atol)


@needs_compiler
@pytest.mark.parametrize("block", ["mamba", "mamba2"])
def test_compiled_calls_run_the_c_ops(block, monkeypatch):
    """Issue 19: the traced calls ran the PyTorch references around the C kernels (slower than
    eager). The compiled programs' steps and chunks run the C kernels, through their ops, once a
    layer (counted at the kernels' wrappers, which the ops call)."""
    from streamssm.kernels.conv1d import conv_cpu
    from streamssm.kernels.mamba1 import scan_cpu as selective_cpu
    from streamssm.kernels.ssd import scan_cpu as ssd_cpu

    calls = Counter()

    def counted(module, name):
        run = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, **kwargs: calls.update([name]) or run(*args, **kwargs))

    for module, name in [(conv_cpu, "conv1d_step_c"), (conv_cpu, "causal_conv1d_cpu"), (ssd_cpu, "scan_into"),
                         (selective_cpu, "selective_scan_step_c"), (selective_cpu, "selective_scan_cpu")]:
        counted(module, name)
    streamer = Streamer(n16(f"{block}-lm"), capacity=3, engine="compiled")
    rows, before = torch.tensor([2, 0]), compiled_graphs()
    with torch.no_grad():
        for length in (1, 5):  # the pool step, a chunk
            streamer._calls(torch.randint(0, VOCAB, (2, length)), rows)
    assert compiled_graphs() == before + 2, "the calls did not run compiled programs"
    scans = {"mamba": ["selective_scan_step_c", "selective_scan_cpu"], "mamba2": ["scan_into"] * 2}[block]
    assert calls == Counter(2 * ["conv1d_step_c", "causal_conv1d_cpu", *scans])  # two layers


@needs_compiler
def test_one_program_for_every_chunk_length(monkeypatch):
    """With the C scan's op, no program branches on the length (the references' chunked SSD
    compiled one per chunk count and "fills its last chunk"): prepare compiles the pool step and
    one chunk program."""
    monkeypatch.setattr(compiled_cpu, "PREPARE_MAX", 16)  # chunk_size 4: 4 chunk counts
    streamer, before = Streamer(tiny("mamba2-lm"), capacity=3, engine="compiled"), compiled_graphs()
    assert streamer.capture() > 0
    assert compiled_graphs() == before + 2


@needs_compiler
def test_prepare_at_start_changes_no_result(monkeypatch):
    """Compiling up front (a live stream in the pool) runs on the scratch row only."""
    monkeypatch.setattr(compiled_cpu, "PREPARE_MAX", 8)  # chunk_size 4: 256 lengths are ~130 programs
    plain = Streamer(tiny("mamba2-regression"), capacity=3, engine="compiled")
    early = Streamer(tiny("mamba2-regression"), capacity=3, engine="compiled")
    chunk = torch.randn(5, 3)
    for streamer in (plain, early):  # the same history (stream ids included) on both
        sid = streamer.open()
        streamer.feed(sid, chunk)
    state_before = [t.clone() for layer in early.pool for t in layer]
    assert early.capture() > 0
    rows = early.capacity  # every stream row: the scratch row (index capacity) may change
    assert all(torch.equal(a[:rows], b[:rows]) for a, b in zip(state_before, (t for layer in early.pool for t in layer)))
    plain.close(sid)
    early.close(sid)
    assert_same(run_churn(plain, seed=6, rounds=5), run_churn(early, seed=6, rounds=5))


def serve_like(streamer: Streamer, shapes: list[tuple[int, int]], seed: int) -> list:
    """Feed (streams, samples) rounds as the service's uniform batching does: the same length for
    every stream of a call, 1..3 of 3 live streams; returns (stream id, outputs, scores) per stream."""
    gen = torch.Generator().manual_seed(seed)
    ids = [streamer.open() for _ in range(3)]
    seen = []
    for b, length in shapes:
        chunks = {sid: torch.randint(0, streamer.cfg.vocab_size, (length,), generator=gen) for sid in ids[:b]}
        seen += [(sid, r.outputs, r.scores) for sid, r in sorted(streamer.feed_many(chunks).items())]
    for sid in ids:
        streamer.close(sid)
    return seen


@needs_compiler
@pytest.mark.slow  # inductor's C++ compile of ~5 programs
def test_after_prepare_no_call_compiles(monkeypatch, caplog):
    """Issue 19: a served call of a shape the prepared programs missed compiled in the hot path
    (69 s). After prepare, no call of 1..capacity streams compiles: up to PREPARE_MAX samples it
    runs a prepared program, a longer one runs as consecutive segments of at most PREPARE_MAX
    through them (the service's 640-sample slices used to run eagerly after a failed guard check,
    slower than the eager engine), and a call that no program covers anyway runs eagerly (logged
    once) instead of compiling; outputs equal eager's. Traced without the C kernels' ops (a
    machine whose C kernels do not build): their references' programs branch on the length."""
    monkeypatch.setattr(cpu_library, "built", lambda module: False)  # traced calls take the references
    monkeypatch.setattr(compiled_cpu, "PREPARE_MAX", 8)  # chunk_size 4: lengths 1, 2-3, 4, 5-7, 8
    eager = Streamer(tiny("mamba2-lm"), capacity=3)
    compiled = Streamer(tiny("mamba2-lm"), capacity=3, engine="compiled")
    assert compiled.capture() > 0
    graphs = compiled_graphs()
    shapes = [(b, n) for b in (1, 2, 3) for n in (1, 8, 6, 3, 2, 5, 4, 7)] + [(2, 1), (1, 6)]
    with caplog.at_level(logging.WARNING, logger="streamssm.compiled_cpu"):
        assert_same(serve_like(eager, shapes, seed=1), serve_like(compiled, shapes, seed=1))
        longer = [(3, 9), (2, 13), (1, 9), (3, 24)]  # segments 8 + 1, 8 + 5, 8 + 8 + 8
        assert_same(serve_like(eager, longer, seed=2), serve_like(compiled, longer, seed=2))
    assert compiled_graphs() == graphs, "a call after prepare compiled a new program"
    assert "run eagerly" not in caplog.text
    monkeypatch.setattr(compiled_cpu, "PREPARE_MAX", 16)  # 9..16 samples: one segment, no program
    with caplog.at_level(logging.WARNING, logger="streamssm.compiled_cpu"):
        uncovered = [(3, 9), (2, 13), (1, 9)]
        assert_same(serve_like(eager, uncovered, seed=3), serve_like(compiled, uncovered, seed=3))
    assert compiled_graphs() == graphs, "a call after prepare compiled a new program"
    assert caplog.text.count("run eagerly") == 1 and "3 streams x 9 samples" in caplog.text


def loaded_programs(cache: Path) -> dict[str, str]:
    """Source of every module loaded so far from inductor's cache folder ``cache``, by path."""
    import sys

    return {m.__file__: Path(m.__file__).read_text() for m in list(sys.modules.values())
            if (getattr(m, "__file__", None) or "").startswith(str(cache)) and m.__file__.endswith(".py")}


@needs_compiler
@pytest.mark.slow  # two cold inductor compiles
@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs 2 torch threads")
def test_programs_use_the_threads_torch_has(tmp_path, monkeypatch):
    """Issue 19: inductor bakes the thread count into the C++ but leaves it out of its cache key,
    so a process at 1 thread (``serve --threads 1``) ran the programs that another process had
    compiled at 2 threads (parallel loops that stall at their barriers on shared cores)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # both compiles in this test
    chunk = {0: torch.randint(0, 5, (64,)), 1: torch.randint(0, 5, (64,))}

    def programs(threads: int) -> list[str]:
        torch._dynamo.reset()
        before = set(loaded_programs(tmp_path))
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # what inductor and the engine read
        streamer = Streamer(tiny("mamba2-lm"), capacity=2, engine="compiled")
        streamer.open(), streamer.open()
        streamer.feed_many(chunk)
        return [src for path, src in loaded_programs(tmp_path).items() if path not in before]

    assert any("num_threads(2)" in src for src in programs(2))  # the shapes are large enough to run in parallel
    one = programs(1)  # none new: the cache's 2-thread programs ran again
    assert one and not any("num_threads(2)" in src for src in one)


def compiler(path: str):
    """Inductor's C++ compiler set to ``path`` while the block runs."""
    from torch._inductor import config

    return config.patch({"cpp.cxx": (path,)})


def test_missing_compiler_falls_back_to_eager_with_a_warning(caplog):
    with compiler("/nonexistent/bin/g++"):
        assert "no working C++ compiler" in compiler_problem()
        with caplog.at_level(logging.WARNING, logger="streamssm.compiled_cpu"):
            streamer = Streamer(tiny("mamba-lm"), capacity=2, engine="compiled")
    assert streamer.engine == "eager" and not isinstance(streamer._calls, CompiledCalls)
    assert "falls back to 'eager'" in caplog.text and "/nonexistent/bin/g++" in caplog.text
    sid = streamer.open()
    assert streamer.feed(sid, torch.tensor([1, 2, 3])).outputs.shape == (3, 5)


def test_broken_compiler_is_named(tmp_path):
    """A compiler that runs but cannot build a library is refused with its own message."""
    fake = tmp_path / "g++"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && exit 0\necho 'cc1plus: fatal error' >&2\nexit 1\n")
    fake.chmod(0o755)
    with compiler(str(fake)):
        problem = compiler_problem()
    assert problem is not None and "cannot build a shared library" in problem and "cc1plus" in problem


def test_compiled_engine_is_for_the_cpu():
    with pytest.raises(ConfigError, match="runs on the CPU"):
        resolve_engine("compiled", torch.device("cuda"))


def test_serve_config_checks_the_engine():
    from streamssm.service.config import ServeConfig

    assert ServeConfig(engine="compiled", prepare=True).engine == "compiled"
    with pytest.raises(ConfigError, match="engine must be one of auto, eager, graphs, compiled"):
        ServeConfig(engine="turbo")
