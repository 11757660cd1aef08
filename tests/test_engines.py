"""Streamer engines: fixed-shape calls (buckets, split segments, scratch-row padding) and CUDA
graphs give the same outputs, scores and carried states as the eager engine, across random
chunkings and stream churn (open / close / snapshot / restore between calls)."""

import random

import pytest
import torch

from streamssm.bucketed import BucketedCalls, power_buckets, split_length, stream_buckets
from streamssm.errors import ConfigError
from streamssm.inference import Streamer
from streamssm.models import ModelConfig, SSMModel
from streamssm.testing import PARITY_FP32, assert_close

VOCAB, CHANNELS = 5, 3
MODELS = {
    "mamba-lm": dict(block="mamba", input_kind="tokens", vocab_size=VOCAB, head="lm"),
    "mamba2-lm": dict(block="mamba2", input_kind="tokens", vocab_size=VOCAB, head="lm"),
    "mamba2-regression": dict(block="mamba2", input_kind="continuous", input_dim=CHANNELS, head="regression",
                              output_dim=2),
    "hybrid-classifier": dict(block="mamba2", input_kind="continuous", input_dim=CHANNELS, head="classifier",
                              output_dim=4, attention_every=2, attention_heads=2, n_layers=3),
}


def tiny(name: str, seed: int = 0) -> SSMModel:
    torch.manual_seed(seed)
    fields = dict(d_model=16, n_layers=2, d_state=8, headdim=8, chunk_size=4) | MODELS[name]
    return SSMModel(ModelConfig(**fields)).eval()


def sample(model: SSMModel, length: int, gen: torch.Generator) -> torch.Tensor:
    if model.cfg.input_kind == "tokens":
        return torch.randint(0, VOCAB, (length,), generator=gen)
    return torch.randn(length, CHANNELS, generator=gen)


def run_churn(streamer: Streamer, seed: int, rounds: int = 14, pipelined: bool = False) -> list:
    """Feed random chunk lengths (0, 1, split and whole segments) to a changing set of streams;
    returns everything observable: outputs, scores, snapshots. ``pipelined``: each call's results
    are read only after the next call is launched (as the service's engine does)."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    model = streamer.model
    live = [streamer.open() for _ in range(3)]
    seen, launched = [], None
    for step in range(rounds):
        if step % 4 == 3 and live:  # churn: close one, open one, move one through a snapshot
            streamer.close(live.pop(rng.randrange(len(live))))
            live.append(streamer.open())
            moved = live.pop(0)
            blob = streamer.snapshot(moved)
            streamer.close(moved)
            live.append(streamer.restore(blob))
            seen.append(("snapshot", blob))
        feed = rng.sample(live, rng.randint(1, len(live)))
        lengths = rng.choice([[1] * len(feed), [rng.choice([0, 1, 2, 3, 5, 11, 13]) for _ in feed], [6] * len(feed)])
        chunks = {sid: sample(model, n, gen) for sid, n in zip(feed, lengths)}
        pending = streamer.launch(chunks, outputs=set(feed[::2]))
        if not pipelined:
            pending, launched = None, pending
        if launched is not None:
            seen.extend(sorted((sid, r.outputs, r.scores) for sid, r in launched.result().chunk_results().items()))
        launched = pending
    if launched is not None:
        seen.extend(sorted((sid, r.outputs, r.scores) for sid, r in launched.result().chunk_results().items()))
    return seen


def assert_same(a: list, b: list) -> None:
    rtol, atol = PARITY_FP32
    # snapshots: the carried state shows in every later output; bytes may differ in rounding
    a, b = ([x for x in seen if x[0] != "snapshot"] for seen in (a, b))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x[0] == y[0]
        for want, got in zip(x[1:], y[1:]):
            assert (want is None) == (got is None)
            if want is not None:
                assert_close(f"stream {x[0]}", want, got, rtol=rtol, atol=atol)


def bucketed(streamer: Streamer, **lengths) -> Streamer:
    """Swap the streamer's engine for the fixed-shape calls run eagerly (the graphs' arithmetic)."""
    streamer._calls = BucketedCalls(streamer.model, streamer.pool, streamer.capacity, **lengths)
    return streamer


def test_split_length_and_buckets():
    assert power_buckets(1) == [1] and power_buckets(6) == [1, 2, 4, 6] and power_buckets(8) == [1, 2, 4, 8]
    lengths = sorted({*power_buckets(8), 3})
    assert split_length(11, lengths) == [8, 3]
    assert split_length(7, lengths) == [4, 3]
    assert sum(split_length(13, lengths)) == 13 and split_length(0, lengths) == []


def test_stream_buckets_pad_at_most_a_third_of_a_call_past_16_streams():
    """Regression (GPU service, 256 clients on 4 workers): calls of ~40 streams ran as bucket 64
    (powers of two), a third of the GPU's work on padding rows; the service then fell behind."""
    buckets = stream_buckets(1024)
    assert buckets[:8] == [1, 2, 4, 8, 16, 24, 32, 48] and buckets[-3:] == [512, 768, 1024]
    for b in range(17, 1025):
        bucket = next(n for n in buckets if n >= b)
        assert (bucket - b) / bucket < 1 / 3, b
    assert stream_buckets(5) == [1, 2, 4, 5] and stream_buckets(100)[-3:] == [64, 96, 100]


@pytest.mark.parametrize("name", list(MODELS))
def test_bucketed_calls_equal_eager_under_churn(name):
    """Padding rows on the scratch row never touch a live stream; split segments carry state."""
    eager = run_churn(Streamer(tiny(name), capacity=5), seed=3)
    fixed = run_churn(bucketed(Streamer(tiny(name), capacity=5), max_length=4, extra_lengths=(3,)), seed=3)
    assert_same(eager, fixed)


def test_bucketed_long_segment_runs_as_one_eager_call():
    streamer = bucketed(Streamer(tiny("mamba2-lm"), capacity=2), max_length=4, extra_lengths=())
    sid = streamer.open()
    streamer.feed(sid, torch.randint(0, VOCAB, (9,)))
    assert streamer._calls.programs == {}  # 9 > 4: no fixed-shape program was needed
    streamer.feed(sid, torch.randint(0, VOCAB, (3,)))
    assert set(streamer._calls.programs) == {(1, 2), (1, 1)}


def test_bucketed_token_budget_bounds_programs():
    """No program is made for more than max_tokens tokens (B x L): bigger calls run eagerly or in
    shorter pieces, and the outputs are the eager engine's."""
    eager = run_churn(Streamer(tiny("mamba2-lm"), capacity=5), seed=5)
    streamer = bucketed(Streamer(tiny("mamba2-lm"), capacity=5), max_length=4, extra_lengths=(3,), max_tokens=8)
    assert_same(eager, run_churn(streamer, seed=5))
    calls = streamer._calls
    assert calls.lengths_for(5) == [1] and calls.lengths_for(4) == [1, 2] and calls.lengths_for(2) == [1, 2, 3, 4]
    calls.prepare()
    assert calls.programs and all(b * n <= 8 for b, n in calls.programs)
    assert (5, 1) in calls.programs and (4, 2) in calls.programs and (4, 3) not in calls.programs
    with pytest.raises(ConfigError, match=r"max_tokens \(4\) must cover one step of every stream \(capacity 5\)"):
        BucketedCalls(streamer.model, streamer.pool, 5, max_tokens=4)


def test_server_calls_replay_programs_by_default():
    """Regression (GPU service sweep): with the old 65,536-token bound, a server call of 76 streams
    x 640 samples (two 20 ms chunks, a slice) had no program at bucket 128 and ran eagerly,
    dispatching every launch from Python beside the event loop. Every default-slice call of up
    to 384 streams now has its program."""
    from streamssm.service.config import ServeConfig

    streamer = Streamer(tiny("mamba2-lm"), capacity=384)
    calls = BucketedCalls(streamer.model, streamer.pool, 384)
    slice_samples = ServeConfig().slice_samples
    for bucket in calls.buckets:
        assert slice_samples in calls.lengths_for(bucket), bucket


def test_prepare_at_start_keeps_no_autograd_history():
    """``Streamer.capture`` (the server's start-up) is called outside the Streamer's no_grad:
    the programs' runs must not record autograd history into the pool (under grad mode every
    prepared program's activations stayed alive through the pool's grad_fn: serve --prepare of
    the 4 x d512 LM ran an 80 GB card out of memory)."""
    class RunWhenMade(BucketedCalls):  # as the graphs engine: making a program runs it (warm-up, capture)
        def make_program(self, bucket, length):
            program = super().make_program(bucket, length)
            program()
            return program

    streamer = Streamer(tiny("mamba2-lm"), capacity=3)
    streamer._calls = RunWhenMade(streamer.model, streamer.pool, streamer.capacity, max_length=4, extra_lengths=())
    assert torch.is_grad_enabled()
    assert streamer.capture() >= 0 and streamer._calls.programs
    for layer in streamer.pool:
        for t in layer:
            assert t.grad_fn is None and not t.requires_grad


def test_scratch_row_is_not_a_stream_row():
    streamer = Streamer(tiny("mamba-lm"), capacity=2)
    assert streamer.pool[0].ssm.shape[0] == 3
    rows = {streamer._slot[streamer.open()], streamer._slot[streamer.open()]}
    assert rows == {0, 1}


def test_engine_choice_is_checked():
    with pytest.raises(ConfigError, match="engine must be one of"):
        Streamer(tiny("mamba-lm"), capacity=1, engine="turbo")
    assert Streamer(tiny("mamba-lm"), capacity=1).engine == "eager"  # auto on the CPU
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="needs a CUDA device"):
            Streamer(tiny("mamba-lm"), capacity=1, engine="graphs")


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(MODELS))
def test_cuda_graphs_equal_eager_under_churn(name):
    """CUDA graphs (captured lazily, then replayed) vs eager launches of the same kernels."""
    eager = run_churn(Streamer(tiny(name), capacity=5, device="cuda", engine="eager"), seed=4, rounds=20)
    graphs = Streamer(tiny(name), capacity=5, device="cuda", engine="graphs")
    assert graphs.engine == "graphs"
    assert_same(eager, run_churn(graphs, seed=4, rounds=20))
    assert graphs._calls.graphs, "no graph was captured"


def test_pipelined_launches_equal_one_call_at_a_time():
    """Reading a call's results after the next call is launched (the service's pipeline) changes
    nothing: the pool carries each stream's state in launch order."""
    one_by_one = run_churn(bucketed(Streamer(tiny("mamba2-lm"), capacity=5)), seed=3)
    assert_same(one_by_one, run_churn(bucketed(Streamer(tiny("mamba2-lm"), capacity=5)), seed=3, pipelined=True))


@pytest.mark.gpu
@pytest.mark.parametrize("engine", ["graphs", "eager"])
def test_cuda_pipelined_launches_equal_eager_one_at_a_time(engine):
    eager = run_churn(Streamer(tiny("mamba2-lm"), capacity=5, device="cuda", engine="eager"), seed=5, rounds=20)
    streamer = Streamer(tiny("mamba2-lm"), capacity=5, device="cuda", engine=engine)
    assert_same(eager, run_churn(streamer, seed=5, rounds=20, pipelined=True))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["mamba2-lm", "hybrid-classifier"])
def test_cuda_launch_never_waits_for_the_device(name):
    """Streamer.launch queues its work without a synchronizing CUDA call (torch's sync debug
    mode raises on one), for equal and ragged chunk lengths, so the host prepares the next call
    while the device runs this one (a plain .to(device) of the inputs waited for the stream)."""
    streamer = Streamer(tiny(name), capacity=6, device="cuda", engine="graphs")
    gen = torch.Generator().manual_seed(0)
    sids = [streamer.open() for _ in range(4)]
    for lengths in ([8, 8, 8, 8], [3, 0, 8, 1]):
        chunks = {sid: sample(streamer.model, n, gen) for sid, n in zip(sids, lengths)}
        streamer.launch(chunks, outputs=set(sids[:2])).result()  # first use: capture, autotune
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            pending = streamer.launch(chunks, outputs=set(sids[:2]))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert pending.result().lens == lengths


@pytest.mark.gpu
def test_capture_at_start_changes_no_result():
    """Capturing every graph up front (with live streams' rows in the static buffers) changes
    nothing: the warm-up runs write only the scratch row."""
    plain = Streamer(tiny("mamba2-lm"), capacity=3, device="cuda", engine="graphs")
    early = Streamer(tiny("mamba2-lm"), capacity=3, device="cuda", engine="graphs")
    prompt = torch.randint(0, VOCAB, (5,), generator=torch.Generator().manual_seed(0))
    for streamer in (plain, early):  # same history in both, so stream ids match too
        sid = streamer.open()
        streamer.feed(sid, prompt)
        if streamer is early:  # the streams' rows (all but the last, the scratch row) stay as they were
            state_before = [t[:-1].clone() for layer in early.pool for t in layer]
            assert early.capture() > 0
            assert all(torch.equal(a, b[:-1]) for a, b in zip(state_before, (t for layer in early.pool for t in layer)))
        streamer.close(sid)
    first = run_churn(plain, seed=6, rounds=5)
    assert_same(first, run_churn(early, seed=6, rounds=5))


@pytest.mark.gpu
def test_prepare_memory_does_not_grow_with_the_number_of_programs():
    """Preparing every program holds about what the largest one needs: warm-ups share one side
    stream and the graphs one pool (a stream per warm-up ran a 140 GB card out of memory)."""
    streamer = Streamer(tiny("mamba2-lm"), capacity=16, device="cuda", engine="graphs")
    calls = streamer._calls
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_reserved()
    largest = calls.buckets[-1], calls.lengths_for(calls.buckets[-1])[-1]
    calls._prepare(*largest)
    one = torch.cuda.memory_reserved() - base
    streamer.capture()
    every = torch.cuda.memory_reserved() - base
    assert len(calls.programs) > 30
    assert every <= 2 * one + 16 * 2**20, f"{len(calls.programs)} programs hold {every / 2**20:.0f} MiB, the largest {one / 2**20:.0f} MiB"
