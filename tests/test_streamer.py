"""Streamer: chunked, interleaved, batched streaming equals the offline full forward per stream."""

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from streamssm.errors import ConfigError, ShapeError, StateError
from streamssm.inference import ChunkResult, Streamer
from streamssm.models import ModelConfig, SSMModel
from streamssm.testing import PARITY_FP32, assert_close

VOCAB, CHANNELS, OUT = 5, 3, 2
HEADS = {
    "lm": dict(input_kind="tokens", vocab_size=VOCAB, head="lm"),
    "regression": dict(input_kind="continuous", input_dim=CHANNELS, head="regression", output_dim=OUT),
    "classifier": dict(input_kind="continuous", input_dim=CHANNELS, head="classifier", output_dim=4),
}


def tiny_model(block: str, head: str, seed: int = 1) -> SSMModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(block=block, d_model=16, n_layers=2, d_state=8, headdim=8, chunk_size=4, **HEADS[head])
    return SSMModel(cfg).eval()


def make_stream(model: SSMModel, length: int, gen: torch.Generator) -> torch.Tensor:
    if model.cfg.input_kind == "tokens":
        return torch.randint(0, VOCAB, (length,), generator=gen)
    return torch.randn(length, CHANNELS, generator=gen)


def offline(model: SSMModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the streamer must produce for the whole stream x: (outputs (l, o), scores (l,) | None)."""
    with torch.no_grad():
        y, _ = model(x.unsqueeze(0))
    y, x = y[0].float().cpu(), x.cpu()
    head = model.cfg.head
    if head == "regression":
        return y, None
    if head == "classifier":
        return F.softmax(y, -1), None
    logp = F.log_softmax(y, -1)
    prev = torch.cat([torch.full((1, VOCAB), -math.log(VOCAB)), logp[:-1]])
    return logp, prev.gather(-1, x.unsqueeze(-1)).squeeze(-1)


def random_cuts(length: int, rng: random.Random) -> list[tuple[int, int]]:
    """Chunk bounds covering [0, length) with lengths 0, 1 and longer mixed."""
    bounds, pos = [], 0
    while pos < length:
        n = rng.choice([0, 1, 1, 2, 3, 5, 8])
        bounds.append((pos, min(length, pos + n)))
        pos = min(length, pos + n)
    return bounds


def collect(results: list[ChunkResult]) -> tuple[torch.Tensor, torch.Tensor | None]:
    outs = torch.cat([r.outputs for r in results])
    scores = None if results[0].scores is None else torch.cat([r.scores for r in results])
    return outs, scores


def check_stream(name: str, model: SSMModel, x: torch.Tensor, results: list[ChunkResult]) -> None:
    want_out, want_scores = offline(model, x)
    got_out, got_scores = collect(results)
    rtol, atol = PARITY_FP32
    assert got_out.dtype == torch.float32 and got_out.device.type == "cpu"
    assert_close(f"{name} outputs", want_out, got_out, rtol=rtol, atol=atol)
    if want_scores is None:
        assert got_scores is None
    else:
        assert_close(f"{name} scores", want_scores, got_scores, rtol=rtol, atol=atol)


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("block", ["mamba", "mamba2"])
@pytest.mark.parametrize("seed", [0, 1])
def test_interleaved_random_chunks_equal_offline(block, head, seed):
    model = tiny_model(block, head)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    streamer = Streamer(model, capacity=4)
    xs = {streamer.open(): make_stream(model, rng.randint(1, 19), gen) for _ in range(3)}
    plans = {sid: random_cuts(len(x), rng) for sid, x in xs.items()}
    results: dict[int, list[ChunkResult]] = {sid: [] for sid in xs}
    while any(plans.values()):
        # a random subset of the streams with chunks left goes into each batched call
        ready = [sid for sid, plan in plans.items() if plan]
        batch = rng.sample(ready, rng.randint(1, len(ready)))
        chunks = {}
        for sid in batch:
            s, e = plans[sid].pop(0)
            chunks[sid] = xs[sid][s:e]
        for sid, r in streamer.feed_many(chunks).items():
            assert r.outputs.shape[0] == chunks[sid].shape[0]
            results[sid].append(r)
    for sid, x in xs.items():
        check_stream(f"{block}/{head} stream {sid}", model, x, results[sid])


@pytest.mark.parametrize("block", ["mamba", "mamba2"])
def test_snapshot_restore_continues_identically(block):
    model = tiny_model(block, "lm")
    gen = torch.Generator().manual_seed(3)
    x = make_stream(model, 17, gen)
    a = Streamer(model, capacity=2)
    sid = a.open()
    first = [a.feed(sid, x[:6]), a.feed(sid, x[6:7])]
    blob = a.snapshot(sid)
    assert isinstance(blob, bytes)
    b = Streamer(tiny_model(block, "lm"), capacity=3)  # "after a restart": a fresh streamer, same weights
    b.open()  # occupy row 0 so the restored stream lands on another row
    rid = b.restore(blob)
    rest_a = [a.feed(sid, x[7:8]), a.feed(sid, x[8:])]
    rest_b = [b.feed(rid, x[7:8]), b.feed(rid, x[8:])]
    for ra, rb in zip(rest_a, rest_b):
        assert torch.equal(ra.outputs, rb.outputs) and torch.equal(ra.scores, rb.scores)
    check_stream(f"{block} restored", model, x, first + rest_b)


def test_snapshot_of_another_model_is_refused():
    a = Streamer(tiny_model("mamba2", "regression", seed=1), capacity=1)
    b = Streamer(tiny_model("mamba2", "regression", seed=2), capacity=1)
    blob = a.snapshot(a.open())
    with pytest.raises(StateError, match="belongs to model"):
        b.restore(blob)
    with pytest.raises(StateError, match="safetensors"):
        b.restore(b"not a snapshot")
    assert b.live == 0


def test_pool_full_and_close_frees_the_slot():
    model = tiny_model("mamba", "regression")
    gen = torch.Generator().manual_seed(4)
    streamer = Streamer(model, capacity=2)
    s0, s1 = streamer.open(), streamer.open()
    streamer.feed(s0, make_stream(model, 5, gen))
    with pytest.raises(StateError, match="pool full"):
        streamer.open()
    streamer.close(s0)
    assert streamer.live == 1
    s2 = streamer.open()  # reuses s0's row, which must start from the zero state again
    assert s2 not in (s0, s1)
    x = make_stream(model, 6, gen)
    check_stream("reused slot", model, x, [streamer.feed(s2, x[:2]), streamer.feed(s2, x[2:])])
    with pytest.raises(StateError, match="unknown stream id"):
        streamer.feed(s0, x)
    with pytest.raises(StateError, match="unknown stream id"):
        streamer.close(s0)


def test_bad_chunks_raise_and_leave_other_streams_untouched():
    model = tiny_model("mamba2", "regression")
    gen = torch.Generator().manual_seed(5)
    streamer = Streamer(model, capacity=3)
    good, other = streamer.open(), streamer.open()
    x = make_stream(model, 9, gen)
    first = streamer.feed(good, x[:4])
    bad_chunks = [
        (torch.randn(3, CHANNELS + 1), "3 channels"),
        (torch.randint(0, 3, (3, CHANNELS)), "float"),
        (torch.randint(0, 3, (2, CHANNELS)), "float"),  # the shape of the good chunk: stacking would promote it
        (torch.randn(2, 3, CHANNELS), "shape"),
        ([1.0, 2.0], "torch.Tensor"),
    ]
    for chunk, msg in bad_chunks:
        with pytest.raises(ShapeError, match=msg):
            streamer.feed_many({good: x[4:6], other: chunk})
    with pytest.raises(StateError, match="unknown stream id 99"):
        streamer.feed_many({good: x[4:6], 99: x[:1]})
    check_stream("after errors", model, x, [first, streamer.feed(good, x[4:])])


@pytest.mark.parametrize("head", ["lm", "regression"])
def test_launch_stacked_equals_launch(head):
    """Chunks of one length stacked by the caller (the serving engine's numpy arrays) compute as the
    same chunks given one by one: outputs, scores and the state carried into the next call; only
    the streams asked for get outputs."""
    model = tiny_model("mamba2", head)
    gen = torch.Generator().manual_seed(8)
    xs = [make_stream(model, 10, gen) for _ in range(3)]
    per_stream, stacked = Streamer(model, capacity=3), Streamer(model, capacity=3)
    ids = [per_stream.open() for _ in xs]
    assert [stacked.open() for _ in xs] == ids
    for a, b in ((0, 6), (6, 10)):
        want = per_stream.launch({sid: x[a:b] for sid, x in zip(ids, xs)}, {ids[0], ids[2]}).result()
        got = stacked.launch_stacked(ids, torch.stack([x[a:b] for x in xs]), {ids[0], ids[2]}).result()
        assert got.lens == want.lens and got.output_row == want.output_row == [0, None, 1]
        torch.testing.assert_close(got.outputs, want.outputs, rtol=0, atol=0)
        if head == "lm":
            np.testing.assert_array_equal(got.scores, want.scores)


@pytest.mark.parametrize("head", ["lm", "regression"])
def test_chunks_of_one_shape_are_checked_once_and_compute_as_checked_one_by_one(head, monkeypatch):
    """feed_many's steady state (every chunk a tensor of one dtype and shape) stacks and checks
    them as one batch, no check per chunk; outputs, scores and carried state equal the per-chunk
    path's (forced here), call after call."""
    model = tiny_model("mamba2", head)
    gen = torch.Generator().manual_seed(9)
    xs = [make_stream(model, 10, gen) for _ in range(3)]
    one_by_one, batched = Streamer(model, capacity=3), Streamer(model, capacity=3)
    monkeypatch.setattr(one_by_one, "_stack_uniform", lambda chunks: None)
    ids = [one_by_one.open() for _ in xs]
    assert [batched.open() for _ in xs] == ids
    checked = []
    real = batched._check_chunk
    monkeypatch.setattr(batched, "_check_chunk", lambda sid, chunk: checked.append(sid) or real(sid, chunk))
    for a, b in ((0, 6), (6, 7), (7, 10)):
        want = one_by_one.feed_many({sid: x[a:b] for sid, x in zip(ids, xs)})
        got = batched.feed_many({sid: x[a:b] for sid, x in zip(ids, xs)})
        for sid in ids:
            torch.testing.assert_close(got[sid].outputs, want[sid].outputs, rtol=0, atol=0)
            if head == "lm":
                torch.testing.assert_close(got[sid].scores, want[sid].scores, rtol=0, atol=0)
    assert not checked, "a uniform batch was checked chunk by chunk"


def test_launch_stacked_names_a_bad_batch():
    lm = Streamer(tiny_model("mamba", "lm"), capacity=2)
    ids = [lm.open(), lm.open()]
    for x, msg in ((torch.randn(2, 4), "integer tensor \\(2, length\\), got torch.float32"),
                   (torch.zeros(3, 4, dtype=torch.long), "of 2 streams"),
                   (torch.zeros(2, 4, 1, dtype=torch.long), "got torch.int64 \\(2, 4, 1\\)"),
                   (np.zeros((2, 4), dtype=np.int64), "torch.Tensor, got ndarray"),
                   (torch.tensor([[1, 2], [3, 9]]), r"stream 1: token ids must lie in \[0, 5\), got \[3, 9\]")):
        with pytest.raises(ShapeError, match=msg):
            lm.launch_stacked(ids, x)
    values = Streamer(tiny_model("mamba2", "regression"), capacity=1)
    sid = values.open()
    with pytest.raises(ShapeError, match=f"float tensor \\(1, length, {CHANNELS}\\)"):
        values.launch_stacked([sid], torch.randn(1, 4, CHANNELS + 1))
    assert lm.launch_stacked([], torch.zeros(0, 0, dtype=torch.long)).result().ids == []


def test_token_and_single_channel_chunks():
    lm = Streamer(tiny_model("mamba", "lm"), capacity=1)
    sid = lm.open()
    with pytest.raises(ShapeError, match=r"token ids must lie in \[0, 5\)"):
        lm.feed(sid, torch.tensor([1, 7]))
    with pytest.raises(ShapeError, match="integer"):
        lm.feed(sid, torch.randn(3))
    empty = lm.feed(sid, torch.zeros(0, dtype=torch.long))
    assert empty.outputs.shape == (0, VOCAB) and empty.scores.shape == (0,)
    torch.manual_seed(0)
    cfg = ModelConfig(block="mamba2", d_model=16, n_layers=1, d_state=8, headdim=8, input_kind="continuous",
                      input_dim=1, head="regression", output_dim=1)
    model = SSMModel(cfg).eval()
    mono = Streamer(model, capacity=1)
    x = torch.randn(7)
    check_stream("(l,) chunk", model, x.unsqueeze(-1), [mono.feed(mono.open(), x)])


def test_bad_construction():
    model = tiny_model("mamba", "regression")
    with pytest.raises(ConfigError, match="capacity"):
        Streamer(model, capacity=0)
    with pytest.raises(ConfigError, match="SSMModel"):
        Streamer(torch.nn.Linear(2, 2), capacity=1)


@pytest.mark.parametrize("block", ["mamba", "mamba2"])
def test_step_pool_touches_only_its_rows(block):
    model = tiny_model(block, "regression")
    pool = tuple(s._replace(conv=torch.randn_like(s.conv), ssm=torch.randn_like(s.ssm))
                 for s in model.init_state(5))
    before = [t.clone() for layer in pool for t in layer]
    rows = torch.tensor([3, 0])
    x_t = torch.randn(2, CHANNELS)
    with torch.no_grad():
        want, new = model.step(x_t, tuple(s._replace(conv=s.conv[rows], ssm=s.ssm[rows]) for s in pool))
        y = model.step_pool(x_t, pool, rows)
    assert_close("step_pool output", want, y, rtol=PARITY_FP32[0], atol=PARITY_FP32[1])
    after = [t for layer in pool for t in layer]
    for b, a, n in zip(before, after, [t for layer in new for t in layer]):
        assert torch.equal(a[[1, 2, 4]], b[[1, 2, 4]])
        assert torch.equal(a[rows], n)


@pytest.mark.gpu
@pytest.mark.parametrize("block", ["mamba", "mamba2"])
def test_streamer_on_gpu_matches_offline(block):
    """CUDA: step kernels + chunked Triton scans in the streamer vs the offline forward (fp32)."""
    model = tiny_model(block, "lm")
    rng, gen = random.Random(5), torch.Generator().manual_seed(5)
    streamer = Streamer(model, capacity=4, device="cuda")
    xs = {streamer.open(): make_stream(model, 40, gen) for _ in range(3)}
    plans = {sid: random_cuts(len(x), rng) for sid, x in xs.items()}
    results: dict[int, list[ChunkResult]] = {sid: [] for sid in xs}
    while any(plans.values()):
        chunks = {}
        for sid, plan in plans.items():
            if plan:
                s, e = plan.pop(0)
                chunks[sid] = xs[sid][s:e]
        for sid, r in streamer.feed_many(chunks).items():
            results[sid].append(r)
    for sid, x in xs.items():
        want_out, want_scores = offline(model, x.cuda())
        got_out, got_scores = collect(results[sid])
        assert_close(f"{block} gpu stream {sid} outputs", want_out, got_out)
        assert_close(f"{block} gpu stream {sid} scores", want_scores, got_scores)


def million_step_plan(length: int, rng: random.Random) -> list[int]:
    """Chunk lengths summing to ``length``: single samples (the step kernels), 20 ms audio chunks
    and long prefills (the chunked path) mixed."""
    sizes, total = [], 0
    while total < length:
        n = min(length - total, rng.choice([1, 1, 1, 7, 320, 320, 4096, 65536]))
        sizes.append(n)
        total += n
    return sizes


def rel_l2(want: torch.Tensor, got: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.mark.gpu
def test_million_step_bf16_mamba2_stream_matches_offline():
    """H100 (issue 6): two interleaved streams of 1,048,576 steps through a 4-layer d_model 512
    Mamba-2 in bf16, fed in mixed chunks, against the offline forward. The streamed bf16 outputs
    may be no further from the fp32 offline forward than the bf16 offline forward is (rounding
    differs by path); fp32 streaming equals fp32 offline at fp32 tolerance. Errors are printed."""
    import copy

    length = 1 << 20
    torch.manual_seed(0)
    cfg = ModelConfig(block="mamba2", d_model=512, n_layers=4, d_state=128, headdim=64, chunk_size=256,
                      input_kind="continuous", input_dim=1, head="regression", output_dim=1)
    model = SSMModel(cfg).eval()
    t = torch.arange(length, dtype=torch.float32)
    xs = torch.stack([torch.sin(t / 50.0) + 0.3 * torch.randn(length), torch.cos(t / 173.0) * torch.randn(length)])
    model16 = copy.deepcopy(model).to("cuda", torch.bfloat16)
    with torch.no_grad():  # one stream per call: a (2, 1M) fp32 forward does not fit in 80 GB
        want32 = torch.stack([model.to("cuda")(x[None, :, None].cuda())[0][0].float().cpu() for x in xs])
        want16 = torch.stack([model16(x[None, :, None].cuda().bfloat16())[0][0].float().cpu() for x in xs])
    del model16
    torch.cuda.empty_cache()
    rng = random.Random(0)
    for dtype in (torch.float32, torch.bfloat16):
        streamer = Streamer(copy.deepcopy(model), capacity=2, device="cuda", dtype=dtype)
        ids = [streamer.open(), streamer.open()]
        plans = {sid: million_step_plan(length, rng) for sid in ids}
        pos = dict.fromkeys(ids, 0)
        got = {sid: [] for sid in ids}
        while any(plans.values()):
            chunks = {}
            for sid in ids:
                if plans[sid]:
                    n = plans[sid].pop(0)
                    chunks[sid] = xs[sid, pos[sid] : pos[sid] + n]
                    pos[sid] += n
            for sid, r in streamer.feed_many(chunks).items():
                got[sid].append(r.outputs)
        out = torch.stack([torch.cat(got[sid]) for sid in ids])  # (2, length, 1)
        assert out.shape == want32.shape
        if dtype == torch.float32:
            assert_close("fp32 stream vs fp32 offline, 1M steps", want32, out)
            print(f"\nfp32 stream vs offline: max abs {float((out - want32).abs().max()):.3e}, "
                  f"rel-L2 {rel_l2(want32, out):.3e}")
            continue
        stream_err, offline_err = (out - want32).abs(), (want16 - want32).abs()
        print(f"bf16 stream vs bf16 offline: max abs {float((out - want16).abs().max()):.3e}, "
              f"rel-L2 {rel_l2(want16, out):.3e}; vs fp32 offline: stream max abs {float(stream_err.max()):.3e} "
              f"rel-L2 {rel_l2(want32, out):.3e}, bf16 offline max abs {float(offline_err.max()):.3e} "
              f"rel-L2 {rel_l2(want32, want16):.3e}; output scale {float(want32.abs().max()):.3e}")
        assert rel_l2(want32, out) <= 2 * rel_l2(want32, want16) + 1e-3
        assert float(stream_err.max()) <= 2 * float(offline_err.max()) + 1e-2


@pytest.mark.parametrize("block", ["mamba", "mamba2", "mamba3"])
def test_scores_only_equals_full_path(block):
    """feed_many(outputs=False | ids): the same scores and states as the full path, outputs None
    for the streams not asked; equal and unequal chunk lengths, empty chunks, one-sample rounds."""
    model = tiny_model(block, "lm")
    rng, gen = random.Random(5), torch.Generator().manual_seed(5)
    full, lean = Streamer(model, capacity=3), Streamer(tiny_model(block, "lm"), capacity=3)
    ids = [full.open() for _ in range(3)]
    assert [lean.open() for _ in range(3)] == ids
    xs = {sid: make_stream(model, 24, gen) for sid in ids}
    pos = dict.fromkeys(ids, 0)
    results: dict[int, list[ChunkResult]] = {sid: [] for sid in ids}
    for call in range(8):
        equal = call % 2 == 0
        n = {sid: (2 if equal else rng.choice([0, 1, 3])) for sid in ids}
        chunks = {sid: xs[sid][pos[sid] : pos[sid] + n[sid]] for sid in ids}
        asked = [False, {ids[0]}, set(), {ids[1], ids[2]}][call % 4]
        want, got = full.feed_many(chunks), lean.feed_many(chunks, outputs=asked)
        for sid in ids:
            pos[sid] += n[sid]
            assert got[sid].scores.shape == (n[sid],)
            assert_close(f"{block} stream {sid} call {call} scores", want[sid].scores, got[sid].scores,
                         rtol=1e-5, atol=1e-5)
            if asked is not False and sid in asked:
                assert torch.equal(got[sid].outputs, want[sid].outputs)
            else:
                assert got[sid].outputs is None
            results[sid].append(want[sid])
    for sid in ids:  # the full path itself still equals the offline forward
        check_stream(f"{block} full stream {sid}", model, xs[sid][: pos[sid]], results[sid])
        assert_close(f"{block} stream {sid} last_output", full.last_output[full._slot[sid]],
                     lean.last_output[lean._slot[sid]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", ["mamba", "mamba2", "mamba3"])
def test_cached_fp32_params_follow_weight_changes(block):
    """The blocks' cached A = -exp(A_log) / fp32 casts track load_state_dict, in-place updates and
    dtype moves, and are bypassed (gradients flow) while autograd records."""
    model = tiny_model(block, "lm", seed=1)
    mixer = model.backbone.layers[0].mixer
    with torch.no_grad():
        a0 = mixer._A()
        assert mixer._A() is a0  # cached while nothing changed
    sd = tiny_model(block, "lm", seed=2).state_dict()
    sd["backbone.layers.0.mixer.A_log"] = sd["backbone.layers.0.mixer.A_log"] + 0.25  # mamba's init is fixed
    model.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(mixer._A(), -torch.exp(mixer.A_log.float()))
        assert not torch.equal(mixer._A(), a0)
        mixer.A_log.add_(0.5)  # an optimizer-style in-place update
        assert torch.equal(mixer._A(), -torch.exp(mixer.A_log.float()))
    model.to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(mixer._A(), -torch.exp(mixer.A_log.float()))
        assert mixer._fp32("D", mixer.D).dtype == torch.float32
        assert torch.equal(mixer._fp32("D", mixer.D), mixer.D.float())
    model.to(torch.float32)
    with torch.no_grad():
        assert torch.equal(mixer._A(), -torch.exp(mixer.A_log.float()))
        assert mixer._fp32("D", mixer.D) is mixer.D  # fp32 already: no copy
    mixer._A().sum().backward()
    assert mixer.A_log.grad is not None and torch.allclose(mixer.A_log.grad, -torch.exp(mixer.A_log.detach()))
