"""RotaryEmbedding: the table and the op behind one nn.Module."""

from typing import Optional, Tuple

import torch
from torch import nn

from rope_ext.functional import LAYOUTS, apply_rope_qk
from rope_ext.tables import cos_sin_table, rope_frequencies


class RotaryEmbedding(nn.Module):
    """Rotary position embedding for q and k.

    Builds an exact float32 table ``[max_positions, r/2]`` once and rotates q and k
    with one fused call per forward.

    Args:
        head_dim: d, the size of each head.
        rotary_dim: r <= head_dim, even; defaults to head_dim. The last d - r dims pass through.
        base: rope_theta.
        max_positions: rows of the table; positions must stay below it.
        scaling: a Hugging Face style rope-scaling dict or None (see :func:`rope_frequencies`).
        interleaved: pair adjacent dims (GPT-J) instead of halves (Llama).
        layout: "bshd", "bhsd" or "thd" for q and k.

    The table stays float32 under ``.to(torch.bfloat16)`` / ``.half()``: a table
    rounded to bf16 would put every angle off by up to ``m * theta * 2**-8``.
    """

    def __init__(self, head_dim: int, *, rotary_dim: Optional[int] = None, base: float = 10000.0,
                 max_positions: int = 4096, scaling: Optional[dict] = None,
                 interleaved: bool = False, layout: str = "bshd"):
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, int):
            raise TypeError(f"head_dim must be an int, got {type(head_dim).__name__}")
        if head_dim <= 0:
            raise ValueError(f"head_dim must be positive, got {head_dim}")
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        inv_freq, attention_factor = rope_frequencies(rotary_dim, base, scaling)
        if rotary_dim > head_dim:
            raise ValueError(f"rotary_dim ({rotary_dim}) must not exceed head_dim ({head_dim})")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.base = base
        self.max_positions = max_positions
        self.scaling = scaling
        self.interleaved = interleaved
        self.layout = layout
        self.attention_factor = attention_factor
        # float64, CPU, not a buffer: .half() must not round it.
        self.inv_freq = inv_freq
        cos, sin = cos_sin_table(inv_freq, max_positions, attention_factor)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.cos.dtype != torch.float32:
            # A dtype cast reached the table: rebuild it exactly, in float32, wherever it now lives.
            self.cos, self.sin = cos_sin_table(self.inv_freq, self.max_positions,
                                               self.attention_factor, device=self.cos.device)
        return self

    def forward(self, q: torch.Tensor, k: torch.Tensor,
                positions: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rotate q and k (layout as given at construction); positions as in :func:`apply_rope`."""
        if positions is None and q.dim() == 4 and self.layout != "thd":
            seq = q.shape[2 if self.layout == "bhsd" else 1]
            if seq > self.max_positions:
                raise ValueError(f"sequence length {seq} exceeds max_positions="
                                 f"{self.max_positions} of this RotaryEmbedding; construct it with "
                                 f"a larger max_positions")
        return apply_rope_qk(q, k, self.cos, self.sin, positions, interleaved=self.interleaved,
                             layout=self.layout)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, base={self.base}, "
                f"max_positions={self.max_positions}, interleaved={self.interleaved}, "
                f"layout={self.layout!r}, scaling={self.scaling}")
