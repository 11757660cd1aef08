"""Chunk layout of the SSD scan: which tokens each chunk covers and which chunks form a sequence.

Every call is handled as packed rows of ``L`` tokens (batch rows back to back, or the
``cu_seqlens`` sequences of batch 1). Chunks never cross a sequence boundary: a sequence of
``len`` tokens owns ``ceil(len / chunk_size)`` consecutive chunks, the last one possibly short.

    T  number of chunks        S  number of sequences (batch rows, or len(cu_seqlens) - 1)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ChunkLayout:
    """Chunk tables on the device of the inputs.

    starts: (T,) int64 first packed token of each chunk; lengths: (T,) int32 tokens in it
    (1..chunk_size); seq_offsets: (S + 1,) int32, chunks of sequence i are
    ``seq_offsets[i]:seq_offsets[i + 1]``.
    """

    starts: torch.Tensor
    lengths: torch.Tensor
    seq_offsets: torch.Tensor
    num_chunks: int
    num_seqs: int
    chunk_size: int


def chunk_layout(batch: int, length: int, chunk_size: int, cu_seqlens: torch.Tensor | None,
                 device: torch.device) -> ChunkLayout:
    """Chunk tables for ``batch`` rows of ``length`` tokens, or for packed ``cu_seqlens`` (batch 1).

    Without ``cu_seqlens`` the tables are built on ``device`` with no host synchronisation
    (CUDA-graph safe); with it, ``cu_seqlens`` is read on the host.
    """
    q = chunk_size
    if cu_seqlens is None:
        per_row = -(-length // q)
        idx = torch.arange(batch * per_row, device=device, dtype=torch.int64)
        row, j = idx // per_row, idx % per_row
        starts = row * length + j * q
        lengths = (length - j * q).clamp(max=q).to(torch.int32)
        seq_offsets = (torch.arange(batch + 1, device=device, dtype=torch.int64) * per_row).to(torch.int32)
        return ChunkLayout(starts, lengths, seq_offsets, batch * per_row, batch, q)
    bounds = cu_seqlens.detach().to("cpu", torch.int64)
    seq_lens = bounds[1:] - bounds[:-1]  # (S,)
    per_seq = (seq_lens + q - 1) // q  # (S,) chunks of each sequence
    seq_offsets = torch.cat([per_seq.new_zeros(1), per_seq.cumsum(0)])  # (S + 1,)
    num_chunks = int(seq_offsets[-1])
    seq_of_chunk = torch.repeat_interleave(torch.arange(len(per_seq)), per_seq)  # (T,)
    j = torch.arange(num_chunks) - seq_offsets[seq_of_chunk]  # chunk index inside its sequence
    starts = bounds[seq_of_chunk] + j * q
    lengths = (seq_lens[seq_of_chunk] - j * q).clamp(max=q)
    return ChunkLayout(
        starts.to(device), lengths.to(device=device, dtype=torch.int32),
        seq_offsets.to(device=device, dtype=torch.int32), num_chunks, len(per_seq), q,
    )


def packed_rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """(b, l, ...) -> (b*l, ...) as a view where possible; last dim made unit-stride."""
    if t is None:
        return None
    t = t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])
    return t if t.stride(-1) == 1 else t.contiguous()
