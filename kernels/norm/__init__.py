"""Residual add fused with the next RMSNorm (the recurrent step's per-layer epilogue)."""
