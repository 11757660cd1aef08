"""Sequence-mixing blocks. Each offers ``forward(x, state)``, ``step(x_t, state)`` and ``init_state``."""

from streamssm.layers.mamba import MambaBlock
from streamssm.layers.mamba2 import Mamba2Block
from streamssm.layers.mamba3 import Mamba3Block
from streamssm.layers.norm import GatedRMSNorm, RMSNorm

__all__ = ["GatedRMSNorm", "Mamba2Block", "Mamba3Block", "MambaBlock", "RMSNorm"]
