"""Multimodal RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL; docs/math.md section 11).

Each token has three positions (temporal, height, width) and each pair takes its
angle from one of them. That needs no kernel of its own: gather a per-token table
``[batch, seq, r/2]`` once, then run the ordinary op on it.
"""

from typing import Sequence, Tuple

import torch


def mrope_streams(mrope_section: Sequence[int], pairs: int,
                  interleaved: bool = False) -> torch.Tensor:
    """Which position stream (0 = t, 1 = h, 2 = w) each of the r/2 pairs reads.

    chunked (Qwen2-VL): pairs [0, a_t) read t, the next a_h read h, the rest w.
    interleaved (Qwen3-VL): T H W T H W ..., with h only below 3 a_h and w below 3 a_w.
    """
    if (not isinstance(mrope_section, (list, tuple)) or len(mrope_section) != 3
            or not all(isinstance(a, int) and not isinstance(a, bool) and a >= 0
                       for a in mrope_section)):
        raise ValueError(f"mrope_section must be three non-negative ints [t, h, w], got "
                         f"{mrope_section!r}")
    if sum(mrope_section) != pairs:
        raise ValueError(f"mrope_section {list(mrope_section)} must add up to rotary_dim / 2 = "
                         f"{pairs} (cos.size(-1))")
    a_t, a_h, a_w = mrope_section
    i = torch.arange(pairs)
    if not interleaved:
        return (i >= a_t).long() + (i >= a_t + a_h).long()
    streams = torch.zeros(pairs, dtype=torch.long)
    streams[(i % 3 == 1) & (i < 3 * a_h)] = 1
    streams[(i % 3 == 2) & (i < 3 * a_w)] = 2
    return streams


def mrope_cos_sin(cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                  mrope_section: Sequence[int], interleaved: bool = False
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token tables ``[batch, seq, r/2]`` from a ``[P, r/2]`` table and ``[3, batch, seq]`` positions.

    Positions may also be ``[3, seq]`` (one sequence). Outside the table: ValueError on the
    CPU; on a GPU (where checking would cost a device sync) those tokens get NaN.
    """
    if cos.dim() != 2 or cos.shape != sin.shape:
        raise ValueError(f"with mrope_section, cos and sin must be one [positions, rotary_dim/2] "
                         f"table, got cos {tuple(cos.shape)} and sin {tuple(sin.shape)}")
    if positions is None or positions.dtype not in (torch.int32, torch.int64):
        raise TypeError("with mrope_section, positions must be an int32/int64 tensor "
                        "[3, batch, seq] of (temporal, height, width) positions")
    if positions.dim() == 2:
        positions = positions.unsqueeze(1)
    if positions.dim() != 3 or positions.shape[0] != 3:
        raise ValueError(f"with mrope_section, positions must be [3, batch, seq] or [3, seq], got "
                         f"shape {tuple(positions.shape)}")
    rows, pairs = cos.shape
    streams = mrope_streams(mrope_section, pairs, interleaved).to(positions.device)
    per_pair = positions.long()[streams].permute(1, 2, 0)  # [batch, seq, r/2]
    valid = (per_pair >= 0) & (per_pair < rows)
    if positions.device.type == "cpu" and not bool(valid.all()):
        raise ValueError(f"positions must lie in [0, {rows}) for a table of {rows} rows, got "
                         f"values in [{int(per_pair.min())}, {int(per_pair.max())}]")
    idx = per_pair.clamp(0, max(rows - 1, 0)).reshape(-1, pairs)
    nan = torch.tensor(float("nan"), dtype=cos.dtype, device=cos.device)
    out = []
    for table in (cos, sin):
        g = table.gather(0, idx).reshape(per_pair.shape)
        out.append(torch.where(valid, g, nan))
    return out[0], out[1]
