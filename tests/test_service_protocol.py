"""Wire protocol: start validation with the right close codes, frame decoding, result encoding."""

import json

import numpy as np
import pytest

from streamssm.errors import ProtocolError
from streamssm.service.protocol import (
    RESULT_HEADER,
    Result,
    Start,
    StreamSpec,
    decode_bases,
    decode_result,
    decode_samples,
    encode_result,
    error_message,
    parse_control,
    parse_start,
)

AUDIO = StreamSpec(formats=("f32le", "s16le"), sample_rate=16000, channels=1)
DNA = StreamSpec(formats=("text",))
SENSOR = StreamSpec(formats=("f32le",), channels=3)


def code_of(fn, *args):
    with pytest.raises(ProtocolError) as err:
        fn(*args)
    assert str(err.value) and err.value.reason
    return err.value.code


def test_parse_start_accepts_and_fills_defaults():
    s = parse_start({"type": "start", "format": "s16le", "sample_rate": 16000}, AUDIO)
    assert s == Start("s16le", 16000, 1)
    s = parse_start({"type": "start", "version": 1, "format": "text", "results": "binary", "include": ["scores"],
                     "resume": "a" * 43, "ack": 7}, DNA)
    assert (s.format, s.results, s.include, s.resume, s.ack, s.sample_rate) == ("text", "binary", ("scores",), "a" * 43, 7, None)
    assert parse_start({"type": "start", "format": "f32le", "channels": 3}, SENSOR).channels == 3


@pytest.mark.parametrize("msg, spec, code", [
    ({"type": "begin", "format": "text"}, DNA, 1008),
    ({"type": "start", "format": "text", "version": 2}, DNA, 1008),
    ({"type": "start", "format": "opus"}, AUDIO, 1003),
    ({"type": "start", "format": "text"}, AUDIO, 1003),  # audio model: no text streams
    ({"type": "start", "format": "f32le"}, AUDIO, 1008),  # sample_rate missing
    ({"type": "start", "format": "f32le", "sample_rate": 8000}, AUDIO, 1008),
    ({"type": "start", "format": "f32le", "sample_rate": 16000, "channels": 2}, AUDIO, 1008),
    ({"type": "start", "format": "f32le", "sample_rate": "16000"}, AUDIO, 1008),
    ({"type": "start", "format": "f32le", "sample_rate": True}, AUDIO, 1008),
    ({"type": "start", "format": "f32le", "channels": 0}, SENSOR, 1008),
    ({"type": "start", "format": "text", "channels": 2}, DNA, 1008),
    ({"type": "start", "format": "text", "resume": "short"}, DNA, 1008),
    ({"type": "start", "format": "text", "results": "xml"}, DNA, 1008),
    ({"type": "start", "format": "text", "include": ["everything"]}, DNA, 1008),
    ({"type": "start", "format": "text", "extra": 1}, DNA, 1008),
])
def test_parse_start_rejects_with_matching_close_code(msg, spec, code):
    assert code_of(parse_start, msg, spec) == code


@pytest.mark.parametrize("text, code", [("{", 1007), ("[1, 2]", 1008), ('{"kind": "start"}', 1008), ("3", 1008)])
def test_parse_control_rejects(text, code):
    assert code_of(parse_control, text) == code


def test_decode_samples_formats_and_limits():
    f32 = Start("f32le", 16000, 2)
    x = np.arange(6, dtype="<f4").reshape(3, 2)
    np.testing.assert_array_equal(decode_samples(x.tobytes(), f32), x)
    s16 = Start("s16le", 16000, 1)
    pcm = np.array([-32768, 0, 16384], dtype="<i2")
    np.testing.assert_array_equal(decode_samples(pcm.tobytes(), s16)[:, 0], [-1.0, 0.0, 0.5])
    assert code_of(decode_samples, x.tobytes()[:-4], f32) == 1007  # half a 2-channel sample
    assert code_of(decode_samples, b"", f32) == 1007
    assert code_of(decode_samples, b"\x00\x00", Start("text", None, 1)) == 1003
    bad = np.array([[1.0, np.inf], [np.nan, 2.0]], dtype="<f4").tobytes()
    assert code_of(decode_samples, bad, f32) == 1007
    np.testing.assert_array_equal(decode_samples(bad, f32, "zero"), [[1.0, 0.0], [0.0, 2.0]])


def test_decode_bases():
    assert decode_bases("acgTNr") == "ACGTNR"
    assert code_of(decode_bases, "ACGU") == 1007
    assert code_of(decode_bases, "AC GT") == 1007
    assert code_of(decode_bases, "") == 1007
    assert code_of(decode_bases, "ACGTR", "ACGTN") == 1007


@pytest.mark.parametrize("results", ["json", "binary"])
@pytest.mark.parametrize("include", [("outputs", "scores"), ("scores",), ("outputs",)])
def test_result_round_trip(results, include):
    rng = np.random.default_rng(0)
    outputs = rng.normal(size=(4, 3)).astype(np.float32)
    scores = rng.normal(size=4).astype(np.float32)
    start = Start("text", None, 1, results=results, include=include)
    msg = encode_result(5, 17, outputs, scores, start)
    assert isinstance(msg, bytes if results == "binary" else str)
    r = decode_result(msg)
    assert isinstance(r, Result) and (r.seq, r.start, r.n) == (5, 17, 4)
    tol = 0 if results == "binary" else 5e-7
    if "outputs" in include:
        np.testing.assert_allclose(r.outputs, outputs, rtol=0, atol=tol)
    else:
        assert r.outputs is None
    if "scores" in include:
        np.testing.assert_allclose(r.scores, scores, rtol=0, atol=tol)
    else:
        assert r.scores is None


def test_binary_result_size_and_corruption():
    start = Start("f32le", 1, 1, results="binary")
    msg = encode_result(0, 0, np.zeros((10, 2), np.float32), None, start)
    assert len(msg) == RESULT_HEADER.size + 10 * 2 * 4
    assert code_of(decode_result, msg[:-1]) == 1007
    assert code_of(decode_result, b"XXXX" + msg[4:]) == 1007


def test_json_results_are_valid_json_even_for_non_finite_outputs():
    start = Start("f32le", 1, 1)
    msg = encode_result(0, 0, np.array([[np.nan, 1.0]], np.float32), None, start)
    assert json.loads(msg)["outputs"] == [[None, 1.0]]


def test_error_message_shape():
    msg = json.loads(error_message(ProtocolError("too big", 1009, "frame_too_big")))
    assert msg == {"type": "error", "code": 1009, "reason": "frame_too_big", "message": "too big"}


@pytest.mark.parametrize("text", ["\u00df", "AC\u017fGT", "\ufb06", "ACGT\u0131", "\uff21CGT"])
def test_decode_bases_refuses_letters_that_case_map_onto_bases(text):
    # ß -> "SS" (2 bases from 1 character), ſ -> S, ﬆ -> ST, dotless ı -> I, fullwidth Ａ -> Ａ
    assert code_of(decode_bases, text) == 1007


def test_decode_bases_accepts_both_ascii_cases():
    assert decode_bases("acgtnRYacGT") == "ACGTNRYACGT"


@pytest.mark.parametrize("msg", [
    {"type": "start", "format": "text", "version": 1.0},
    {"type": "start", "format": "text", "version": True},
    {"type": "start", "format": "s16le", "sample_rate": 16000, "channels": 2**31},
    {"type": "start", "format": "s16le", "sample_rate": 16000, "channels": 257},
    {"type": "start", "format": "s16le", "sample_rate": 2**31},
])
def test_parse_start_refuses_non_integer_versions_and_huge_counts(msg):
    spec = StreamSpec(formats=("text", "s16le"), sample_rate=None, channels=None)
    assert code_of(parse_start, msg, spec) == 1008


def test_huge_json_integer_is_invalid_data_not_a_crash():
    assert code_of(parse_control, '{"type": "start", "ack": ' + "9" * 5000 + "}") == 1007


def test_result_pieces_join_to_the_whole_result():
    from streamssm.service.protocol import join_result, result_piece

    rng = np.random.default_rng(0)
    outputs, scores = rng.normal(size=(9, 3)).astype(np.float32), rng.normal(size=9).astype(np.float32)
    for results in ("json", "binary"):
        start = Start("text", None, 1, results=results)
        pieces = [result_piece(outputs[a:b], scores[a:b], start) for a, b in [(0, 4), (4, 5), (5, 9)]]
        assert join_result(3, 11, 3, pieces, start) == encode_result(3, 11, outputs, scores, start)
