"""ModelState helpers: size, stream selection/write-back, the one state format (safetensors round
trip, extra tensors, metadata reader, bad bytes) and its users' compatibility with the bytes
written before it (Streamer snapshots, parked-stream files)."""

import base64
import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from streamssm.service.resume import FILE_FORMAT, Parked, ResumeStore, owner_of

from streamssm.errors import StateError
from streamssm.inference import SNAPSHOT_FORMAT, Streamer
from streamssm.models import ModelConfig, SSMModel
from streamssm.state import (
    LayerState,
    read_state_metadata,
    read_state_record,
    save_reproducible,
    select_streams,
    state_from_bytes,
    state_nbytes,
    state_to_bytes,
    write_streams,
)


def random_state(batch: int, layers: int = 2) -> tuple[LayerState, ...]:
    return tuple(LayerState(torch.randn(batch, 6, 3), torch.randn(batch, 2, 4, 5)) for _ in range(layers))


def test_nbytes_counts_every_tensor():
    state = random_state(3)
    assert state_nbytes(state) == 2 * 3 * (6 * 3 + 2 * 4 * 5) * 4


def test_select_then_write_back_touches_only_those_rows():
    pool = random_state(5)
    before = tuple(LayerState(*(t.clone() for t in layer)) for layer in pool)
    index = torch.tensor([3, 1])
    picked = select_streams(pool, index)
    assert picked[0].conv.shape[0] == 2 and torch.equal(picked[1].ssm[0], pool[1].ssm[3])
    write_streams(pool, index, tuple(LayerState(c + 1, s + 1) for c, s in picked))
    for layer, old in zip(pool, before):
        for new_t, old_t in zip(layer, old):
            assert torch.equal(new_t[index], old_t[index] + 1)
            assert torch.equal(new_t[[0, 2, 4]], old_t[[0, 2, 4]])


def test_bytes_round_trip_is_exact():
    state = random_state(2, layers=3)
    back = state_from_bytes(state_to_bytes(state, {"stream": "7"}))
    assert len(back) == 3
    for layer, other in zip(state, back):
        for a, b in zip(layer, other):
            assert torch.equal(a, b)


def test_equal_states_give_equal_bytes():
    """Snapshots and resume records can be compared and deduplicated by their bytes (safetensors
    alone writes its header maps in hash order)."""
    state = random_state(2, layers=3)
    meta = {f"key{i}": str(i) for i in range(8)}
    blobs = {state_to_bytes(state, meta) for _ in range(10)}
    blobs.add(state_to_bytes(tuple(LayerState(*(t.clone() for t in layer)) for layer in state),
                             dict(reversed(meta.items()))))
    assert len(blobs) == 1
    blob = blobs.pop()
    assert int.from_bytes(blob[:8], "little") % 8 == 0
    back = state_from_bytes(blob)
    assert all(torch.equal(a, b) for layer, other in zip(state, back) for a, b in zip(layer, other))


@pytest.mark.parametrize("blob", [b"", b"not safetensors at all", b"\x00" * 64])
def test_malformed_bytes_raise_state_error(blob):
    with pytest.raises(StateError, match="safetensors"):
        state_from_bytes(blob)


def test_model_state_size_is_independent_of_stream_length():
    model = SSMModel(ModelConfig(block="mamba2", d_model=16, n_layers=2, d_state=8, headdim=8, chunk_size=8,
                                 vocab_size=5)).eval()
    with torch.no_grad():
        _, short = model(torch.randint(0, 5, (1, 5)))
        _, long = model(torch.randint(0, 5, (1, 500)))
    assert state_nbytes(short) == state_nbytes(long) == state_nbytes(model.init_state(1))


# ----------------------------------------------------------------------------- extras and metadata


def test_record_round_trip_keeps_extra_tensors_and_metadata():
    state = random_state(1)
    extra = {"last_output": torch.randn(7), "replay.0": torch.arange(5, dtype=torch.uint8)}
    record = read_state_record(state_to_bytes(state, {"format": "x"}, extra))
    assert record.metadata == {"format": "x", "num_layers": "2"}
    assert set(record.tensors) == set(extra) and all(torch.equal(record.tensors[k], v) for k, v in extra.items())
    assert all(torch.equal(a, b) for layer, other in zip(state, record.state) for a, b in zip(layer, other))
    with pytest.raises(StateError, match="besides the model state"):  # a plain state reader refuses extras
        state_from_bytes(state_to_bytes(state, extra_tensors=extra))
    with pytest.raises(StateError, match="collides"):
        state_to_bytes(state, extra_tensors={"layer9.conv": torch.zeros(1)})


def test_record_missing_a_layer_tensor_is_refused():
    blob = save_reproducible({"layer0.conv": torch.zeros(2), "layer0.ssm": torch.zeros(2), "layer1.conv": torch.zeros(2)},
                             {"num_layers": "2"})
    with pytest.raises(StateError, match="layer1.ssm"):
        read_state_record(blob)


def test_read_state_metadata_reads_the_header_of_bytes_and_files(tmp_path):
    blob = state_to_bytes(random_state(1), {"next_chunk": "3"})
    assert read_state_metadata(blob) == {"next_chunk": "3", "num_layers": "2"}
    path = tmp_path / "r.safetensors"
    path.write_bytes(blob[: 8 + int.from_bytes(blob[:8], "little")])  # header only: no tensor is read
    assert read_state_metadata(path) == {"next_chunk": "3", "num_layers": "2"}


def header_blob(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


@pytest.mark.parametrize("blob, problem", [
    (b"", "no header length"),
    (b"\x05\x00\x00", "no header length"),
    (struct.pack("<Q", 1000) + b'{"__metadata__": {}}', "truncated"),
    (header_blob(b"{not json"), "not JSON"),
    (header_blob(b"\xff\xfe"), "not JSON"),
    (header_blob(b"[1, 2]"), "not a map of strings"),
    (header_blob(b'{"__metadata__": [1]}'), "not a map of strings"),
    (header_blob(b'{"__metadata__": {"next_chunk": 3}}'), "not a map of strings"),
    (header_blob(b'{"__metadata__": {"a": null}}'), "not a map of strings"),
])
def test_read_state_metadata_refuses_malformed_headers(blob, problem):
    with pytest.raises(StateError, match=problem):
        read_state_metadata(blob)


def test_read_state_metadata_of_a_damaged_file_is_a_state_error(tmp_path):
    """A file whose first 8 bytes are text reads as an enormous header length: refused as
    truncated (it raised MemoryError reading that many bytes)."""
    path = tmp_path / "r.safetensors"
    path.write_bytes(b"garbage\n")
    with pytest.raises(StateError, match="truncated"):
        read_state_metadata(path)


def test_a_header_without_metadata_has_none():
    assert read_state_metadata(header_blob(b"{}")) == {}


# ----------------------------------------------------------------------------- bytes of older code


def tiny_streamer(seed: int = 1) -> Streamer:
    torch.manual_seed(seed)
    cfg = ModelConfig(block="mamba2", d_model=16, n_layers=2, d_state=8, headdim=8, chunk_size=4, vocab_size=5)
    return Streamer(SSMModel(cfg).eval(), capacity=2)


def legacy_snapshot(s: Streamer, sid: int) -> bytes:
    """A snapshot as Streamer.snapshot wrote it before the one state format: one stream's tensors
    without the batch axis, ``last_output``, metadata format / fingerprint / num_layers, through
    plain safetensors (header maps in hash order, so not byte-reproducible)."""
    row = s._slot[sid]
    tensors = {"last_output": s.last_output[row].clone()}
    for i, layer in enumerate(s.pool):
        for field, t in zip(LayerState._fields, layer):
            tensors[f"layer{i}.{field}"] = t[row].clone()
    return st_save(tensors, metadata={"format": "streamssm-stream-snapshot-1", "fingerprint": s.fingerprint,
                                      "num_layers": str(len(s.pool))})


def test_snapshot_written_before_the_one_format_restores_and_keeps_its_layout():
    a = tiny_streamer()
    sid = a.open()
    tokens = torch.randint(0, 5, (12,))
    a.feed(sid, tokens[:7])
    old = legacy_snapshot(a, sid)
    assert read_state_metadata(a.snapshot(sid)) == read_state_metadata(old)
    assert a.snapshot(sid) == save_reproducible(*_tensors_and_meta(old))  # same tensors, names, metadata
    b = tiny_streamer()
    rid = b.restore(old)
    expected = a.feed(sid, tokens[7:])
    got = b.feed(rid, tokens[7:])
    assert torch.equal(got.outputs, expected.outputs) and torch.equal(got.scores, expected.scores)


def _tensors_and_meta(blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return st_load(blob), read_state_metadata(blob)


def test_snapshot_with_a_wrong_tensor_shape_names_it():
    a = tiny_streamer()
    sid = a.open()
    record = read_state_record(a.snapshot(sid))
    bad = state_to_bytes(record.state, record.metadata, {"last_output": torch.zeros(3)})
    with pytest.raises(StateError, match="last_output has shape"):
        tiny_streamer().restore(bad)
    with pytest.raises(StateError, match="expected"):
        tiny_streamer().restore(state_to_bytes(record.state[:1], record.metadata, record.tensors))


def parked_stream(s: Streamer) -> Parked:
    sid = s.open()
    s.feed(sid, torch.randint(0, 5, (9,)))
    return Parked(s.snapshot(sid), owner_of("tok"), {"format": "text", "include": ["scores"]}, 3, 9,
                  {"log_likelihood": -4.5}, [(1, '{"type": "result", "seq": 1}'), (2, b"SSR1\x00\xff"), (3, "")],
                  expires=1e12)


def test_parked_file_is_a_state_record_and_round_trips_exactly():
    parked = parked_stream(tiny_streamer())
    blob = parked.to_bytes()
    assert read_state_metadata(blob)["format"] == SNAPSHOT_FORMAT  # the snapshot's metadata, readable as is
    assert json.loads(read_state_metadata(blob)["parked"])["format"] == FILE_FORMAT
    back = Parked.from_bytes(blob)
    assert back == parked  # snapshot bytes, replay (text and binary), fields
    assert back.to_bytes() == blob


def test_parked_file_of_the_json_form_still_resumes(tmp_path):
    """A stream parked by a server before the one state format (JSON, base64 snapshot) survives the
    upgrade: the new server resumes it from its old file."""
    s = tiny_streamer()
    parked = parked_stream(s)
    store = ResumeStore(ttl=60, state_dir=tmp_path)
    token = store.new_token(parked.owner)
    old = {"format": FILE_FORMAT, "snapshot": base64.b64encode(legacy_snapshot(s, 0)).decode(),
           "owner": parked.owner, "settings": parked.settings, "next_seq": 3, "samples": 9,
           "stats": parked.stats, "expires": 1e12,
           "replay": [{"seq": 1, "text": parked.replay[0][1]}, {"seq": 2, "b64": base64.b64encode(parked.replay[1][1]).decode()},
                      {"seq": 3, "text": ""}]}
    (tmp_path / (hashlib.sha256(token.encode()).hexdigest() + ".json")).write_text(json.dumps(old))
    got = ResumeStore(ttl=60, state_dir=tmp_path).take(token, parked.owner)
    assert got.replay == parked.replay and (got.next_seq, got.samples, got.stats) == (3, 9, parked.stats)
    rid = s.restore(got.snapshot)
    assert torch.equal(s.pool[1].ssm[s._slot[rid]], s.pool[1].ssm[s._slot[0]])
    store.write_ahead(token, got)  # written again: the new form replaces the old file
    assert [p.suffix for p in tmp_path.iterdir() if p.name != "resume.key"] == [".safetensors"]
