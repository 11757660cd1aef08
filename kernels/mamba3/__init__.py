"""Mamba-3 (trapezoidal discretization, rotating complex state): ``reference.py`` (the spec),
``chunked.py`` (one SSD scan with input weights), ``rotary.py`` (Triton rotation of B and C
per head), ``step.py`` (Triton step). The public, validated ops are
``streamssm.kernels.mamba3_scan`` and ``streamssm.kernels.mamba3_step``."""
