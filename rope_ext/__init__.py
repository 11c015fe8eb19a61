"""rope_ext: Rotary Position Embedding as one fast, exact PyTorch operator.

    import rope_ext
    inv_freq, attn = rope_ext.rope_frequencies(128, base=500000.0)
    cos, sin = rope_ext.cos_sin_table(inv_freq, 8192, attn)
    q, k = rope_ext.apply_rope_qk(q, k, cos, sin, positions)

The ops are also reachable as torch.ops.rope.apply / apply_ / apply_qk / apply_qk_.
``rope_ext.hf`` holds the Hugging Face drop-in (imported on first use).
"""

from rope_ext import _ops  # noqa: F401  (registers the ops first)
from rope_ext import context_parallel
from rope_ext.axial import axial_cos_sin
from rope_ext.functional import apply_rope, apply_rope_qk, rms_norm_rope_qk
from rope_ext.module import RotaryEmbedding
from rope_ext.mrope import mrope_cos_sin
from rope_ext.packing import packed_positions
from rope_ext.tables import cos_sin_table, rope_frequencies

__version__ = "0.1.0"

__all__ = ["apply_rope", "apply_rope_qk", "rms_norm_rope_qk", "rope_frequencies", "cos_sin_table",
           "RotaryEmbedding", "mrope_cos_sin", "axial_cos_sin", "packed_positions",
           "context_parallel", "hf"]


def __getattr__(name):
    # rope_ext.hf without an explicit import, and without loading it for users who never need it.
    if name == "hf":
        import importlib

        return importlib.import_module("rope_ext.hf")
    raise AttributeError(f"module 'rope_ext' has no attribute {name!r}")
