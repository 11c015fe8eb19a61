"""RotaryEmbedding: the table and the op behind one nn.Module."""

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from rope_ext import hf_config
from rope_ext._ops import ops
from rope_ext.functional import LAYOUTS, apply_rope_qk
from rope_ext.scaling import dynamic_inv_freq, longrope_inv_freq, rope_type_of
from rope_ext.tables import cos_sin_table, rope_frequencies


class RotaryEmbedding(nn.Module):
    """Rotary position embedding for q and k.

    Builds an exact float32 table ``[max_positions, r/2]`` once and rotates q and k
    with one fused call per forward.

    Args:
        head_dim: d, the size of each head.
        rotary_dim: r <= head_dim, even; defaults to head_dim. The last d - r dims pass through.
        base: rope_theta.
        max_positions: rows of the precomputed table (transformers'
            max_position_embeddings): a size hint. Any position below 2**31 is rotated
            exactly: a position past the table gets the row the table would hold, computed
            in the kernel from the float64 inverse frequencies (no host sync on a GPU, so
            CUDA graphs still capture it); without positions, a longer sequence grows the
            table to its length.
        scaling: a Hugging Face style rope-scaling dict or None (see :func:`rope_frequencies`).
        interleaved: pair adjacent dims (GPT-J) instead of halves (Llama).
        layout: "bshd", "bhsd" or "thd" for q and k.
        mrope_section: multimodal RoPE ``[t, h, w]`` (Qwen2-VL); positions are then
            ``[3, batch, seq]``. mrope_interleaved selects Qwen3-VL's assignment.

    The table stays float32 under ``.to(torch.bfloat16)`` / ``.half()``: a table
    rounded to bf16 would put every angle off by up to ``m * theta * 2**-8``.

    Two rope_types follow the sequence as transformers does, from ``max(positions) + 1``
    (a device sync on a GPU, and a graph break under torch.compile, as in transformers):
    "dynamic" grows the base for sequences beyond the longest seen so far and returns
    to the original table for sequences below max_positions; "longrope" uses the long
    factors above original_max_position_embeddings and the short ones below.
    """

    def __init__(self, head_dim: int, *, rotary_dim: Optional[int] = None, base: float = 10000.0,
                 max_positions: int = 4096, scaling: Optional[dict] = None,
                 interleaved: bool = False, layout: str = "bshd",
                 mrope_section: Optional[Sequence[int]] = None, mrope_interleaved: bool = False):
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
        if isinstance(max_positions, bool) or not isinstance(max_positions, int):
            raise TypeError(f"max_positions must be an int, got {type(max_positions).__name__}")
        if max_positions <= 0:
            raise ValueError(f"max_positions must be positive, got {max_positions}")
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.base = float(base)
        self.max_positions = max_positions
        self.scaling = scaling
        self.rope_type = rope_type_of(scaling)
        self.interleaved = interleaved
        self.layout = layout
        self.mrope_section = None if mrope_section is None else list(mrope_section)
        self.mrope_interleaved = mrope_interleaved
        # A fixed table, no MRoPE, bshd: forward goes straight to the op (per call,
        # Python is the cost of a decode step's RoPE).
        self._direct = (self.rope_type not in ("dynamic", "longrope") and mrope_section is None
                        and layout == "bshd")
        self.attention_factor = attention_factor
        # float64 and on the CPU, not buffers: .half() must not round them.
        self.original_inv_freq = inv_freq
        self.inv_freq = inv_freq
        # The sequence length the current table was made for (dynamic NTK's "cached" length).
        self.table_seq_len = max_positions
        cos, sin = cos_sin_table(inv_freq, max_positions, attention_factor)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        # The kernel computes rows past the table from these (float64, beside the table).
        self.register_buffer("inv_freq_table", inv_freq.clone(), persistent=False)

    @classmethod
    def from_hf_config(cls, config, *, layout: str = "bshd",
                       layer_type: Optional[str] = None) -> "RotaryEmbedding":
        """The rotary embedding of a transformers model, from its config.

        Args:
            config: a transformers ``PretrainedConfig`` or a plain dict of its fields
                (Llama 2/3/3.1, Mistral, Qwen2, Qwen2-VL, Phi-3, GPT-NeoX, GPT-J, Gemma 1-4, ...).
            layout: layout of the q and k the module will get.
            layer_type: the layer type whose rotary embedding to build, for configs with one
                rope dict per layer type (Gemma 2/3/4: "sliding_attention",
                "full_attention"); it also picks that layer type's own head_dim (Gemma 4's
                full-attention layers). Such a config without it, or with a layer type it
                does not have, raises ValueError naming the available ones. Configs with
                one rope dict ignore it.

        Reads head_dim, partial rotary (``partial_rotary_factor``, GPT-NeoX ``rotary_pct``,
        GPT-J ``rotary_dim``), rope_theta, the scaling dict (``rope_parameters`` or the
        legacy ``rope_scaling``), max_position_embeddings and MRoPE's mrope_section. With
        rope_type "proportional" the table spans the whole head (its partial factor is a
        scaling key: the other pairs have frequency 0).
        """
        kw = hf_config.rotary_kwargs(config, layer_type)
        return cls(layout=layout, **kw)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.cos.dtype != torch.float32:
            # A dtype cast reached the table: rebuild it exactly, in float32, wherever it now lives.
            self._set_table(self.inv_freq, self.cos.shape[0], self.cos.device)
        return self

    def _set_table(self, inv_freq: torch.Tensor, rows: int, device) -> None:
        self.inv_freq = inv_freq
        self.inv_freq_table = inv_freq.to(device=device, dtype=torch.float64)
        self.cos, self.sin = cos_sin_table(inv_freq, rows, self.attention_factor, device=device)

    def _follow_sequence(self, seq_len: int) -> None:
        """transformers' dynamic_rope_update: pick the table for a sequence of seq_len positions."""
        device = self.cos.device
        if self.rope_type == "dynamic":
            if seq_len > self.table_seq_len:  # grow
                factor = self.scaling["factor"]
                inv = dynamic_inv_freq(self.rotary_dim, self.base, factor, self.max_positions,
                                       seq_len)
                # max_positions rows: past them the kernel computes each row (with positions),
                # or forward grows the table to the sequence's length (without).
                self._set_table(inv, self.max_positions, device)
                self.table_seq_len = seq_len
            elif seq_len < self.max_positions < self.table_seq_len:  # reset
                self._set_table(self.original_inv_freq, self.max_positions, device)
                self.table_seq_len = self.max_positions
        elif self.rope_type == "longrope":
            original = self.scaling["original_max_position_embeddings"]
            long = seq_len > original
            if long != (self.inv_freq is not self.original_inv_freq):
                inv = (longrope_inv_freq(self.rotary_dim, self.base, self.scaling, long=True)
                       if long else self.original_inv_freq)
                self._set_table(inv, self.max_positions, device)

    def forward(self, q: torch.Tensor, k: torch.Tensor,
                positions: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rotate q and k (layout as given at construction); positions as in :func:`apply_rope`."""
        if self._direct and type(q) is torch.Tensor and q.dim() == 4 and type(k) is torch.Tensor:
            buffers = self._buffers  # not self.cos: Module.__getattr__ is slow
            if positions is None:
                if q.shape[1] > buffers["cos"].shape[0]:
                    self._grow(q.shape[1])
                return ops.apply_qk(q, k, buffers["cos"], buffers["sin"], None,
                                    self.interleaved, False)
            return ops.apply_qk(q, k, buffers["cos"], buffers["sin"], positions, self.interleaved,
                                False, buffers["inv_freq_table"], self.attention_factor)
        seq = None
        if q.dim() == 4 and self.layout != "thd":
            seq = q.shape[2 if self.layout == "bhsd" else 1]
        if self.rope_type in ("dynamic", "longrope"):
            needed = int(positions.max()) + 1 if positions is not None and positions.numel() else seq
            if needed is not None:
                self._follow_sequence(needed)
        if positions is None and seq is not None and seq > self.cos.shape[0]:
            self._grow(seq)
        past_table = {} if positions is None or self.mrope_section is not None else dict(
            inv_freq=self.inv_freq_table, attention_factor=self.attention_factor)
        return apply_rope_qk(q, k, self.cos, self.sin, positions, interleaved=self.interleaved,
                             layout=self.layout, mrope_section=self.mrope_section,
                             mrope_interleaved=self.mrope_interleaved, **past_table)

    def _grow(self, seq: int) -> None:
        """A sequence longer than the table, without positions: its length is known from
        its shape (no sync), so the table grows to it, exactly, once per new length."""
        if seq >= 2**31:
            raise ValueError(f"sequence length {seq} must be below 2**31")
        self._set_table(self.inv_freq, seq, self.cos.device)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, base={self.base}, "
                f"max_positions={self.max_positions}, interleaved={self.interleaved}, "
                f"layout={self.layout!r}, scaling={self.scaling}")
