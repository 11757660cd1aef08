"""Hybrid backbones: sliding-window attention layers among SSM layers, with a bounded state."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from streamssm.errors import ConfigError
from streamssm.layers.attention import SlidingWindowAttention
from streamssm.models import ArchConfig, ModelConfig, SSMModel
from streamssm.state import (
    LayerState,
    select_streams,
    state_from_bytes,
    state_nbytes,
    state_to_bytes,
    write_streams,
)
from streamssm.testing import PARITY_FP32, assert_close, assert_states_close, run_in_chunks, run_step_by_step

LENGTH = 23
WINDOW = 5  # streams of LENGTH steps are over 4x longer than the window


def tiny_hybrid(block: str = "mamba2", dtype=torch.float32, **overrides) -> SSMModel:
    cfg = dict(block=block, d_model=16, n_layers=3, d_state=8, headdim=8, chunk_size=8, attention_every=2,
               attention_heads=2, attention_window=WINDOW, input_kind="continuous", input_dim=3,
               head="regression", output_dim=2)
    cfg.update(overrides)
    torch.manual_seed(1)
    return SSMModel(ModelConfig(**cfg)).to(dtype).eval()


def attention_layer(window: int) -> SlidingWindowAttention:
    """One attention layer of width 8, 2 heads, in eval mode."""
    cfg = ArchConfig(d_model=8, n_layers=1, headdim=8, layer_pattern="a", attention_heads=2, attention_window=window)
    return SlidingWindowAttention(cfg).eval()


def test_layer_kinds_from_config():
    cfg = ModelConfig(n_layers=8, vocab_size=4, attention_every=4, d_model=32, attention_heads=2)
    assert cfg.layer_kinds == ("ssm",) * 3 + ("attention",) + ("ssm",) * 3 + ("attention",)
    cfg = ModelConfig(n_layers=3, vocab_size=4, layer_pattern="ama", d_model=32, attention_heads=2)
    assert cfg.layer_kinds == ("attention", "ssm", "attention")
    assert ModelConfig(vocab_size=4).layer_kinds == ("ssm",) * 4
    model = SSMModel(cfg)
    assert [type(layer.mixer).__name__ for layer in model.backbone.layers] == [
        "SlidingWindowAttention", "Mamba2Block", "SlidingWindowAttention"]
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("overrides, message", [
    (dict(layer_pattern="mx", n_layers=2), "layer_pattern"),
    (dict(layer_pattern="mam", n_layers=2), "layer_pattern"),
    (dict(layer_pattern="ma", n_layers=2, attention_every=2), "not both"),
    (dict(attention_every=2, attention_heads=3), "divisible by attention_heads"),
    (dict(attention_every=2, attention_heads=16), "must be even"),
    (dict(attention_every=2, attention_window=0), "attention_window"),
    (dict(attention_every=-1), "attention_every"),
])
def test_hybrid_config_errors(overrides, message):
    cfg = dict(d_model=16, n_layers=4, vocab_size=4)
    cfg.update(overrides)
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**cfg)


@pytest.mark.parametrize("block", ["mamba", "mamba2"])
@settings(max_examples=5)
@given(cuts=st.lists(st.integers(1, LENGTH - 1), max_size=5, unique=True).map(sorted))
def test_hybrid_full_equals_chunked(block, cuts):
    model = tiny_hybrid(block)
    x = torch.randn(2, LENGTH, 3, generator=torch.Generator().manual_seed(len(cuts)))
    with torch.no_grad():
        full, full_state = model(x)
        chunked, chunked_state = run_in_chunks(model, x, cuts)
    assert_close(f"{block} hybrid chunked {cuts}", full, chunked, rtol=PARITY_FP32[0], atol=PARITY_FP32[1])
    assert_states_close(f"{block} hybrid chunked", full_state, chunked_state, *PARITY_FP32)


@pytest.mark.parametrize("block", ["mamba", "mamba2"])
@pytest.mark.parametrize("pattern", ["", "amm", "aaa"])
def test_hybrid_full_equals_step(block, pattern):
    model = tiny_hybrid(block, **(dict(layer_pattern=pattern, attention_every=0) if pattern else {}))
    x = torch.randn(2, LENGTH, 3)
    with torch.no_grad():
        full, full_state = model(x)
        stepped, step_state = run_step_by_step(model, x)
    assert_close(f"{block} hybrid {pattern or 'every 2'} step", full, stepped, rtol=PARITY_FP32[0], atol=PARITY_FP32[1])
    assert_states_close(f"{block} hybrid step", full_state, step_state, *PARITY_FP32)


def test_hybrid_bf16_modes_agree():
    model = tiny_hybrid(dtype=torch.bfloat16)
    x = torch.randn(2, LENGTH, 3, dtype=torch.bfloat16)
    with torch.no_grad():
        full, _ = model(x)
        chunked, _ = run_in_chunks(model, x, [4, 11])
        stepped, _ = run_step_by_step(model, x)
    assert_close("hybrid bf16 chunked", full, chunked, dtype=torch.bfloat16)
    assert_close("hybrid bf16 step", full, stepped, dtype=torch.bfloat16)


def test_attention_query_blocks_and_rows_at_different_positions():
    """Query blocks smaller than the chunk give the same result, and rows of one batch may sit
    at different stream positions (as in a service pool)."""
    torch.manual_seed(0)
    layer = attention_layer(window=4)
    a, b = torch.randn(1, 9, 8), torch.randn(1, 3, 8)
    nxt = torch.randn(2, 7, 8)
    with torch.no_grad():
        _, sa = layer(a)
        _, sb = layer(b)
        both = LayerState(torch.cat([sa.conv, sb.conv]), torch.cat([sa.ssm, sb.ssm]))
        y, s = layer(nxt, both)
        layer.block_size = 2
        y_blocks, s_blocks = layer(nxt, both)
        ya, _ = layer(torch.cat([a, nxt[:1]], 1))
        yb, _ = layer(torch.cat([b, nxt[1:]], 1))
    assert s.conv.tolist() == [[16], [10]]
    assert_close("blocked queries", y, y_blocks, rtol=1e-6, atol=1e-6)
    assert_close("blocked ring", s.ssm, s_blocks.ssm, rtol=0, atol=0)
    assert_close("row at position 9", ya[:, 9:], y[:1], rtol=1e-5, atol=1e-5)
    assert_close("row at position 3", yb[:, 3:], y[1:], rtol=1e-5, atol=1e-5)


def test_attention_window_forgets_older_inputs():
    """Through attention alone, the output at t >= window ignores inputs before t - window + 1."""
    torch.manual_seed(0)
    layer = attention_layer(window=WINDOW)
    x = torch.randn(1, 12, 8)
    x2 = x.clone()
    x2[:, 0] += 5.0
    with torch.no_grad():
        y, _ = layer(x)
        y2, _ = layer(x2)
    assert_close("outside the window", y[:, WINDOW:], y2[:, WINDOW:], rtol=0, atol=1e-6)
    assert (y[:, :WINDOW] - y2[:, :WINDOW]).abs().amax(-1).min() > 1e-3  # inside: it matters


def test_attention_step_pool_updates_rows_in_place():
    model = tiny_hybrid()
    pool = model.init_state(5)
    rows = torch.tensor([3, 1])
    x = torch.randn(2, 6, 3)
    with torch.no_grad():
        expected, expected_state = run_step_by_step(model, x)
        outs = [model.step_pool(x[:, t], pool, rows) for t in range(x.shape[1])]
    assert_close("step_pool output", expected, torch.stack(outs, 1), rtol=PARITY_FP32[0], atol=PARITY_FP32[1])
    assert_states_close("step_pool rows", expected_state, select_streams(pool, rows), *PARITY_FP32)
    untouched = select_streams(pool, torch.tensor([0, 2, 4]))
    assert all(not t.any() for layer in untouched for t in layer)


def test_hybrid_state_is_bounded_and_serializes():
    """State bytes after 10x more steps are the same; bytes round-trip and resume the stream."""
    model = tiny_hybrid()
    short_x, long_x = torch.randn(1, 2 * WINDOW, 3), torch.randn(1, 20 * WINDOW, 3)
    with torch.no_grad():
        _, short = run_step_by_step(model, short_x)
        _, long = run_step_by_step(model, long_x)
        _, long_chunked = model(long_x)
    assert state_nbytes(short) == state_nbytes(long) == state_nbytes(long_chunked) == state_nbytes(model.init_state(1))
    assert len(state_to_bytes(short)) == len(state_to_bytes(long))
    restored = state_from_bytes(state_to_bytes(long))
    assert_states_close("round trip", long, restored, 0, 0)
    more = torch.randn(1, 7, 3)
    with torch.no_grad():
        y_direct, _ = model(more, long)
        y_restored, _ = model(more, restored)
    assert_close("resumed", y_direct, y_restored, rtol=0, atol=0)


def test_hybrid_pool_select_and_write_streams():
    model = tiny_hybrid()
    with torch.no_grad():
        _, state = model(torch.randn(2, 9, 3))
    pool = model.init_state(4)
    write_streams(pool, torch.tensor([2, 0]), state)
    back = select_streams(pool, torch.tensor([2, 0]))
    assert_states_close("pool", state, back, 0, 0)
    assert back[1].conv.dtype == torch.int64 and back[1].conv.tolist() == [[9], [9]]


# ----------------------------------------------------------------------------- why hybrids

KEYS, VALUES, PAIRS, QUERIES = 16, 16, 8, 8


def recall_batch(n: int, gen: torch.Generator):
    """Multi-query associative recall: k1 v1 .. k8 v8 then 8 queries k v; predict each queried v.

    Returns inputs (n, 31), targets (n, 31), mask (n, 31) of the positions that are scored.
    """
    keys = torch.argsort(torch.rand(n, KEYS, generator=gen), dim=1)[:, :PAIRS]  # distinct keys
    values = torch.randint(0, VALUES, (n, PAIRS), generator=gen) + KEYS
    context = torch.stack([keys, values], 2).reshape(n, 2 * PAIRS)
    pick = torch.randint(0, PAIRS, (n, QUERIES), generator=gen)
    queries = torch.stack([keys.gather(1, pick), values.gather(1, pick)], 2).reshape(n, 2 * QUERIES)
    seq = torch.cat([context, queries], 1)
    mask = torch.zeros(n, seq.shape[1] - 1, dtype=torch.bool)
    mask[:, 2 * PAIRS :: 2] = True  # the step after each query key
    return seq[:, :-1], seq[:, 1:], mask


def train_recall(pattern: str, steps: int = 120, seed: int = 0) -> float:
    torch.manual_seed(seed)
    cfg = ModelConfig(block="mamba2", d_model=32, n_layers=len(pattern), d_state=16, headdim=16, chunk_size=16,
                      vocab_size=KEYS + VALUES, layer_pattern=pattern, attention_heads=2, attention_window=64)
    model = SSMModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y, mask = recall_batch(64, gen)
        loss = F.cross_entropy(model(x)[0][mask], y[mask])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        x, y, mask = recall_batch(512, torch.Generator().manual_seed(999))
        return float((model(x)[0][mask].argmax(-1) == y[mask]).float().mean())


@pytest.fixture
def one_thread():
    """A tiny model trains fastest on one thread (and does not fight a parallel test worker)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_hybrid_beats_pure_mamba2_on_associative_recall(record_property, one_thread):
    """Same width and depth (2 layers, d_model 32), same data and steps: one attention layer
    solves recall; pure Mamba-2 stays near chance (1/16) after the same 120 steps."""
    hybrid = train_recall("ma")
    pure = train_recall("mm")
    record_property("recall_accuracy", {"hybrid": hybrid, "mamba2": pure})
    assert hybrid >= 0.9, f"hybrid recall accuracy {hybrid:.3f} (pure Mamba-2: {pure:.3f})"
    assert hybrid - pure >= 0.4, f"hybrid {hybrid:.3f} vs pure Mamba-2 {pure:.3f}"


def test_streamer_runs_hybrids_unchanged():
    """The Streamer's pool (batched chunked forwards + in-place pool steps) serves a hybrid:
    per-stream outputs equal the offline forward, also across a snapshot/restore."""
    from streamssm.inference import Streamer

    model = tiny_hybrid()
    xa, xb = torch.randn(2 * LENGTH, 3), torch.randn(2 * LENGTH, 3)
    with torch.no_grad():
        ya, _ = model(xa[None])
        yb, _ = model(xb[None])
    streamer = Streamer(model, capacity=3)
    sa, sb = streamer.open(), streamer.open()
    cuts_a, cuts_b = [3, 4, 11, 12, 30, 46], [1, 2, 9, 21, 22, 46]  # lengths 1 go through step_pool
    outs_a, outs_b, start_a, start_b = [], [], 0, 0
    for i, (ea, eb) in enumerate(zip(cuts_a, cuts_b)):
        if i == 3:  # move stream a to a fresh row through a snapshot
            sa_new = streamer.restore(streamer.snapshot(sa))
            streamer.close(sa)
            sa = sa_new
        res = streamer.feed_many({sa: xa[start_a:ea], sb: xb[start_b:eb]})
        outs_a.append(res[sa].outputs)
        outs_b.append(res[sb].outputs)
        start_a, start_b = ea, eb
    assert_close("streamed hybrid a", ya[0], torch.cat(outs_a), rtol=1e-5, atol=1e-5)
    assert_close("streamed hybrid b", yb[0], torch.cat(outs_b), rtol=1e-5, atol=1e-5)
