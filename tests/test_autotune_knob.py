"""``STREAMSSM_AUTOTUNE=0`` leaves each Triton kernel its first GPU config (no autotuning: the
GPU correctness tests' device time); unset, the whole list."""

from __future__ import annotations

import os
import subprocess
import sys

COUNT = """
from streamssm.kernels.ssd import chunk_scan_bwd
from streamssm.kernels.conv1d import conv
k = chunk_scan_bwd._chunk_scan_bwd_dc_kernel
first = chunk_scan_bwd._configs(chunk_scan_bwd._DC_TILES)[0]
assert k.configs[0].kwargs == first.kwargs and k.configs[0].num_warps == first.num_warps, k.configs[0]
print(len(k.configs), len(chunk_scan_bwd._DC_TILES), len(conv._causal_conv1d_fwd_kernel.configs))
"""


def _counts(**env: str) -> list[int]:
    env = {**{k: v for k, v in os.environ.items() if k != "STREAMSSM_AUTOTUNE"}, "TRITON_INTERPRET": "0", **env}
    done = subprocess.run([sys.executable, "-c", COUNT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return [int(v) for v in done.stdout.split()]


def test_first_config_only_when_switched_off():
    configs, listed, conv_configs = _counts(STREAMSSM_AUTOTUNE="0")
    assert configs == 1 and conv_configs == 1 and listed > 1


def test_every_config_by_default():
    configs, listed, conv_configs = _counts()
    assert configs == listed and conv_configs > 1
