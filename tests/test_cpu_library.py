"""kernels/cpu_library.py: C kernels built on first use, cached, loaded; every failure on the way
is a warning and None (the callers' PyTorch paths run), never an error; the inputs' row layout."""

import itertools
import logging

import pytest
import torch

import streamssm.kernels.cpu_library as cpu_library

SOURCE = 'extern "C" int streamssm_answer() { return 42; }\n'
needs_compiler = pytest.mark.skipif(cpu_library.compiler() is None, reason="no C++ compiler here")


def test_compiler_lookup_and_none(monkeypatch, tmp_path, caplog):
    """$CXX first, then c++ / g++ / clang++ on the PATH; with none of them the library is None and
    the warning says so, without importing inductor."""
    fake = tmp_path / "my-cxx"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    cpu_library.compiler.cache_clear()
    try:
        assert cpu_library.compiler() == str(fake)
        monkeypatch.setenv("CXX", "no-such-compiler")
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
        cpu_library.compiler.cache_clear()
        assert cpu_library.compiler() is None
        with caplog.at_level(logging.WARNING, logger=cpu_library.__name__):
            assert cpu_library.build_library("answer", SOURCE) is None
        assert "no C++ compiler ($CXX, c++, g++ or clang++ on the PATH)" in caplog.text
    finally:
        cpu_library.compiler.cache_clear()


@needs_compiler
def test_builds_once_per_source_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cpu_library.build_library("answer", SOURCE).streamssm_answer() == 42
    assert len(list((tmp_path / "streamssm").glob("answer_*.so"))) == 1
    monkeypatch.setattr(cpu_library, "_build", lambda *a: pytest.fail("built again"))
    assert cpu_library.build_library("answer", SOURCE).streamssm_answer() == 42  # from the cache
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_library, "cpu_identity", lambda: "another CPU")
    assert cpu_library.build_library("answer", SOURCE).streamssm_answer() == 42
    assert len(list((tmp_path / "streamssm").glob("answer_*.so"))) == 2  # a CPU of its own, a library of its own


@needs_compiler
@pytest.mark.parametrize("broken", ["cache is a file", "compile error", "corrupt library"])
def test_failures_are_warnings(monkeypatch, tmp_path, caplog, broken):
    source = SOURCE
    if broken == "cache is a file":
        (tmp_path / "file").write_text("")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    if broken == "compile error":
        source = "this is not C++"
    if broken == "corrupt library":
        monkeypatch.setattr(cpu_library, "_build", lambda cxx, src, path: path.parent.mkdir(parents=True) or
                            path.write_bytes(b"not a shared object"))
    with caplog.at_level(logging.WARNING, logger=cpu_library.__name__):
        assert cpu_library.build_library("answer", source) is None
    assert "the C kernels of answer are off" in caplog.text


@needs_compiler
@pytest.mark.parametrize("block, libraries", [("mamba2", ["causal", "norm", "scores", "ssd"]),
                                              ("mamba", ["causal", "norm", "scores", "selective"]),
                                              ("mamba3", ["norm", "scores", "ssd"])])
def test_a_cpu_streamer_builds_its_models_c_kernels_when_created(monkeypatch, tmp_path, block, libraries):
    """The first Streamer on a CPU machine builds the libraries its model calls in its constructor
    (a server's start-up), so its first model call does not stall for the compiler; not the other
    block types' scans (the Mamba-1 scan was built for Mamba-2 models: ~1.5 s of start-up)."""
    from streamssm.inference import Streamer
    from streamssm.kernels import cpu_libraries
    from streamssm.models import ModelConfig, SSMModel

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for lib in cpu_libraries():
        lib.cache_clear()
    try:
        model = SSMModel(ModelConfig(input_kind="tokens", vocab_size=5, head="lm", block=block, d_model=8,
                                     n_layers=1, d_state=4, headdim=4, chunk_size=8))
        Streamer(model, capacity=2)
        built = sorted(f.name.split("_")[0] for f in (tmp_path / "streamssm").glob("*.so"))
        assert built == libraries
    finally:
        for lib in cpu_libraries():
            lib.cache_clear()


def test_a_block_type_without_its_own_list_gets_every_library():
    """``cpu_libraries`` of a block type it does not list (None, or one added later) is all five,
    so no model starts without its kernels built."""
    from streamssm.kernels import cpu_libraries

    assert cpu_libraries("a-block-from-later") == cpu_libraries() and len(cpu_libraries()) == 5
    assert set(cpu_libraries("mamba2")) < set(cpu_libraries())


def test_strided_rows_copies_exactly_what_is_not_contiguous_past_the_first_two_dims():
    """strided_rows' check of the trailing dims agrees with ``t[0, 0].is_contiguous()`` over
    permuted, sliced and size-1 layouts, and it copies only where that is False."""
    for shape in [(3, 2, 4, 5), (2, 3, 1, 5), (2, 2, 4, 1), (2, 3, 4)]:
        base = torch.randn(*shape)
        for perm in itertools.permutations(range(len(shape))):
            for t in (base.permute(*perm), base.permute(*perm)[..., ::2]):
                assert cpu_library._trailing_contiguous(t) == t[0, 0].is_contiguous(), (shape, perm, t.stride())
                kept, sb, sl = cpu_library.strided_rows(t)
                assert (kept.data_ptr() == t.data_ptr()) == t[0, 0].is_contiguous()
                assert torch.equal(kept, t) and (sb, sl) == kept.stride()[:2]
