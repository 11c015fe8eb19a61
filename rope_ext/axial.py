"""Axial (multi-axis) RoPE tables for diffusion transformers (docs/math.md section 16).

Image and video transformers give every token several coordinates (frame, row, column, ...)
and split the rotary pairs of a head between them: pairs ``[0, d_0/2)`` turn with axis 0,
the next ``d_1/2`` with axis 1, and so on, each axis with its own frequencies
``theta_a ** (-2j / d_a)``. Flux's ``FluxPosEmbed``, Wan, HunyuanVideo, CogVideoX, Qwen-Image
and Cosmos build such tables; this module builds the same ones as per-token, per-pair
``(cos, sin)`` that :func:`rope_ext.apply_rope` takes with ``positions=None``.

Everything is built on the ids' device with tensor ops whose shapes come from the host:
no ``.item()``, no copy from the host, no Python loop over tokens, so a call never waits
for the device and traces under ``torch.compile(fullgraph=True)``.

Nothing here imports diffusers.
"""

import math
from numbers import Real
from typing import Optional, Sequence, Tuple, Union

import torch

Number = Union[int, float]
PerAxis = Union[Number, Sequence[Number]]

__all__ = ["axial_cos_sin", "axial_inv_freq", "video_grid_ids", "ltx_video_cos_sin"]


# ---------------------------------------------------------------------------------------------
# Argument checks (every message names the argument and says what to change)
# ---------------------------------------------------------------------------------------------


def _check_axes_dim(axes_dim) -> Tuple[int, ...]:
    if isinstance(axes_dim, (str, bytes)) or not isinstance(axes_dim, Sequence) or not axes_dim:
        raise ValueError(f"axes_dim must be a non-empty list of even ints (the rotated dims of "
                         f"each axis, e.g. (16, 56, 56) for Flux), got {axes_dim!r}")
    for a, d in enumerate(axes_dim):
        if isinstance(d, bool) or not isinstance(d, int):
            raise ValueError(f"axes_dim[{a}] must be an int, got {d!r}")
        if d < 0 or d % 2:
            raise ValueError(f"axes_dim[{a}] must be a non-negative even int (each rotated pair "
                             f"takes two dims), got {d}")
    return tuple(axes_dim)


def _per_axis(value: PerAxis, n_axes: int, name: str, default: float) -> Tuple[float, ...]:
    """One positive finite number, or one per axis, as a tuple of n_axes floats."""
    if value is None:
        value = default
    values = value if isinstance(value, (list, tuple)) else (value,) * n_axes
    if len(values) != n_axes:
        raise ValueError(f"{name} must be one number or one per axis ({n_axes} axes, as many as "
                         f"axes_dim has), got {len(values)} values: {value!r}")
    out = []
    for a, v in enumerate(values):
        if isinstance(v, torch.Tensor) or isinstance(v, bool) or not isinstance(v, Real):
            raise TypeError(f"{name} must be a Python number or a list of them (one per axis), "
                            f"got {type(v).__name__} for axis {a}")
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be positive and finite, got {v!r} for axis {a}")
        out.append(float(v))
    return tuple(out)


def _check_dtype(dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype (the tables' dtype, e.g. "
                        f"torch.float32), got {dtype!r}")


def _check_ids(ids, n_axes: int, name: str = "ids") -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [..., n_axes], got {type(ids).__name__}")
    if ids.dtype == torch.bool or ids.is_complex():
        raise TypeError(f"{name} must hold integer or floating-point positions, got {ids.dtype}")
    if ids.dim() == 0 or ids.shape[-1] != n_axes:
        raise ValueError(f"{name} must be [..., n_axes] with n_axes = {n_axes} (one position per "
                         f"axis), got shape {tuple(ids.shape)}")


# ---------------------------------------------------------------------------------------------
# Shared ids: build once, broadcast
# ---------------------------------------------------------------------------------------------


def _squeeze_broadcast(ids: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, ...]]:
    """ids with every broadcast (stride 0, size > 1) leading dim cut to size 1, and the shape to
    expand the result back to. A batch of equal rows made with ``expand`` is thus built once;
    the strides are host metadata, so this costs no device sync."""
    lead = tuple(ids.shape[:-1])
    index = tuple(slice(0, 1) if ids.shape[d] > 1 and ids.stride(d) == 0 else slice(None)
                  for d in range(ids.dim() - 1))
    return ids[index], lead


def _expand_back(t: torch.Tensor, lead: Tuple[int, ...]) -> torch.Tensor:
    return t if tuple(t.shape[:-1]) == lead else t.expand(*lead, t.shape[-1])


# ---------------------------------------------------------------------------------------------
# The tables
# ---------------------------------------------------------------------------------------------


def axial_inv_freq(axes_dim: Sequence[int], theta: PerAxis = 10000.0, *,
                   linear_factor: PerAxis = 1.0, ntk_factor: PerAxis = 1.0,
                   device: Optional[torch.device] = None) -> torch.Tensor:
    """The inverse frequency of every pair, float64 ``[sum(axes_dim) // 2]``, in axis order.

    Pair j of axis a (``j < d_a / 2``) turns at ``(theta_a * ntk_a) ** (-2j / d_a) / linear_a``:
    each axis uses its own dimension in the exponent, as diffusers' ``get_1d_rotary_pos_embed``
    does per axis; ``ntk_factor`` raises the base (NTK-aware scaling) and ``linear_factor``
    divides the frequencies (position interpolation).

    Built with device ops (no copy from the host), on `device` (default: the CPU).
    """
    axes_dim = _check_axes_dim(axes_dim)
    n = len(axes_dim)
    thetas = _per_axis(theta, n, "theta", 10000.0)
    linear = _per_axis(linear_factor, n, "linear_factor", 1.0)
    ntk = _per_axis(ntk_factor, n, "ntk_factor", 1.0)
    parts = []
    for d, base, lin, nf in zip(axes_dim, thetas, linear, ntk):
        exponent = torch.arange(0, d, 2, dtype=torch.float64, device=device) / d
        inv = (base * nf) ** (-exponent)
        parts.append(inv / lin if lin != 1.0 else inv)
    return torch.cat(parts)


def axial_cos_sin(ids: torch.Tensor, axes_dim: Sequence[int], theta: PerAxis = 10000.0, *,
                  dtype: torch.dtype = torch.float32, linear_factor: PerAxis = 1.0,
                  ntk_factor: PerAxis = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token RoPE tables for tokens with several coordinates (Flux, Wan, HunyuanVideo, ...).

    ``cos[..., p] = cos(ids[..., a] * w_p)`` and ``sin[..., p] = sin(ids[..., a] * w_p)``,
    where pair p belongs to axis a (pairs ``[0, d_0/2)`` to axis 0, the next ``d_1/2`` to
    axis 1, ...) and ``w_p`` is its inverse frequency (:func:`axial_inv_freq`). Angles, cos and
    sin are computed in float64 and rounded once to `dtype`.

    Args:
        ids: the positions, ``[..., n_axes]``, int or float, any device (e.g. Flux's
            ``torch.cat([txt_ids, img_ids])`` ``[N, 3]``, or :func:`video_grid_ids`).
        axes_dim: the rotated dims of each axis, each even: ``(16, 56, 56)`` for Flux
            (``len(axes_dim) == n_axes``).
        theta: the base, one number or one per axis.
        dtype: the tables' floating-point dtype.
        linear_factor, ntk_factor: diffusers' ``get_1d_rotary_pos_embed`` scalings, one
            number or one per axis (Cosmos raises each axis' base by its own NTK factor).

    Returns:
        ``(cos, sin)``, each ``[..., sum(axes_dim) // 2]`` on ids' device: one row per token,
        one value per pair, for ``apply_rope(x, cos, sin, interleaved=...)`` with
        ``positions=None``. ``interleaved=True`` pairs ``(x[2i], x[2i+1])``, as diffusers'
        ``apply_rotary_emb(use_real_unbind_dim=-1)`` and complex freqs do (Flux, Wan,
        HunyuanVideo, CogVideoX, Qwen-Image); ``interleaved=False`` pairs ``(x[i], x[i+r/2])``,
        as ``use_real_unbind_dim=-2`` does (Cosmos).

    Ids shared by the batch are built once: pass ``[N, n_axes]`` (or ``[1, N, n_axes]``) and
    the op broadcasts the ``[N, r/2]`` (``[1, N, r/2]``) table over the batch. A batch made
    with ``ids.expand(B, N, n_axes)`` (stride 0 along the batch) is also built once, and the
    result comes back expanded the same way.

    No host sync: shapes come from the host, frequencies are built on the device, and no
    value is read back, so the call traces under ``torch.compile(fullgraph=True)``.
    """
    axes_dim = _check_axes_dim(axes_dim)
    _check_ids(ids, len(axes_dim))
    _check_dtype(dtype)
    inv = axial_inv_freq(axes_dim, theta, linear_factor=linear_factor, ntk_factor=ntk_factor,
                         device=ids.device)
    core, lead = _squeeze_broadcast(ids)
    pos = core.to(torch.float64)
    # Each axis' coordinate times its own frequencies, then side by side: a handful of
    # broadcast products (one per axis), never an index per token.
    offsets = [0]
    for d in axes_dim:
        offsets.append(offsets[-1] + d // 2)
    angle = torch.cat([pos[..., a:a + 1] * inv[offsets[a]:offsets[a + 1]]
                       for a in range(len(axes_dim))], dim=-1)
    cos, sin = torch.cos(angle).to(dtype), torch.sin(angle).to(dtype)
    return _expand_back(cos, lead), _expand_back(sin, lead)


def ltx_video_cos_sin(coords: torch.Tensor, dim: int, theta: float = 10000.0, *,
                      dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """LTX-Video's 3-D table: per-token ``(cos, sin)`` ``[..., dim // 2]``, float64 math.

    LTX-Video rotates the whole projection (all heads as one vector of `dim` = heads *
    head_dim, before the heads are split), interleaved, with a scheme of its own:

    - ``n = dim // 6`` frequencies ``f_j = theta ** (j / (n - 1)) * pi / 2`` (rising, from
      ``pi / 2`` to ``theta * pi / 2``), shared by the three axes;
    - the angle of axis a at frequency j is ``f_j * (2 * coords[..., a] - 1)``, coords being
      the fractional coordinates of LTX's grid (positions times the interpolation scale and
      patch size, divided by the base size: ``video_grid_ids(..., step=...)``);
    - pairs are frequency-major (``f_0`` t, h, w, ``f_1`` t, h, w, ...), after
      ``(dim % 6) // 2`` identity pairs (cos 1, sin 0) at the front.

    Use it as ``apply_rope(x.unflatten(-1, (1, dim)), cos, sin, interleaved=True)`` on the
    ``[batch, seq, dim]`` projection (one "head" of `dim`), since each head gets other pairs.
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0 or dim % 2:
        raise ValueError(f"dim must be a non-negative even int (LTX's inner_dim, heads * "
                         f"head_dim), got {dim!r}")
    if isinstance(theta, (list, tuple)):
        raise TypeError(f"theta must be one number (LTX-Video's axes share their frequencies), "
                        f"got {theta!r}")
    (base,) = _per_axis(theta, 1, "theta", 10000.0)
    _check_ids(coords, 3, "coords")
    _check_dtype(dtype)
    n = dim // 6
    pad = (dim % 6) // 2
    device = coords.device
    steps = torch.arange(n, dtype=torch.float64, device=device)
    freqs = (base ** (steps / (n - 1)) if n > 1 else steps + 1.0) * (math.pi / 2)
    core, lead = _squeeze_broadcast(coords)
    scaled = core.to(torch.float64) * 2 - 1
    angle = (scaled.unsqueeze(-2) * freqs.unsqueeze(-1)).flatten(-2)  # [..., n * 3], j-major
    cos, sin = torch.cos(angle), torch.sin(angle)
    if pad:
        shape = tuple(angle.shape[:-1]) + (pad,)
        cos = torch.cat([torch.ones(shape, dtype=torch.float64, device=device), cos], dim=-1)
        sin = torch.cat([torch.zeros(shape, dtype=torch.float64, device=device), sin], dim=-1)
    return _expand_back(cos.to(dtype), lead), _expand_back(sin.to(dtype), lead)


# ---------------------------------------------------------------------------------------------
# Grids
# ---------------------------------------------------------------------------------------------


def _axis_option(value, name: str, kinds) -> tuple:
    values = value if isinstance(value, (list, tuple)) else (value,) * 3
    if len(values) != 3:
        raise ValueError(f"{name} must be one value or three (frame, height, width), got "
                         f"{value!r}")
    for a, v in enumerate(values):
        if isinstance(v, torch.Tensor) or (isinstance(v, bool) and bool not in kinds) \
                or not isinstance(v, kinds):
            raise TypeError(f"{name} must be {' or '.join(k.__name__ for k in kinds)} (or three "
                            f"of them), got {type(v).__name__} for axis {a}")
        if not isinstance(v, bool) and not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {v!r} for axis {a}")
    return tuple(values)


def video_grid_ids(frames: Union[int, torch.Tensor], height: int, width: int, *,
                   start: PerAxis = 0, step: PerAxis = 1,
                   center: Union[bool, Sequence[bool]] = False,
                   dtype: Optional[torch.dtype] = None,
                   device: Optional[torch.device] = None) -> torch.Tensor:
    """The (frame, row, column) ids of a video's token grid, ``[frames * height * width, 3]``.

    Tokens come frame by frame, then row by row (width fastest): the order in which Wan,
    HunyuanVideo, CogVideoX, LTX-Video, Qwen-Image and Cosmos flatten their latents, and with
    ``frames=1`` Flux's image ids ``(0, h, w)``. Axis a's k-th coordinate is
    ``start[a] + step[a] * k``, k in ``range(n_a)``, or with ``center[a]`` in
    ``range(-(n_a - n_a // 2), n_a // 2)`` (Qwen-Image's ``scale_rope``: the middle of the
    image at 0).

    Args:
        frames: the number of frames, or a 1-D tensor of the frames' k (HunyuanVideo
            Framepack's ``frame_indices``; start and step still apply).
        height, width: the grid's rows and columns (latent size over the patch size).
        start: the first coordinate, one number or (frame, height, width): e.g. ``(i, 0, 0)``
            for the i-th image of Qwen-Image, ``(1, 0, 0)`` for Flux Kontext's reference image.
        step: the spacing, one number or three: LTX-Video's ``scale * patch / base`` per axis,
            Cosmos' ``base_fps / fps`` on frames, CogVideoX's crop spacing.
        center: centre the axis on 0 (one bool or three).
        dtype: default int64 when every start and step is an int (and frames is not a
            floating tensor), float64 otherwise.
        device: default frames' device if it is a tensor, else the CPU.

    The ids are shared by the batch: :func:`axial_cos_sin` turns them into ``[N, r/2]``
    tables that the op broadcasts over the batch.
    """
    for name, n in (("height", height), ("width", width)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{name} must be a non-negative int (grid size), got {n!r}")
    starts = _axis_option(start, "start", (int, float))
    steps_ = _axis_option(step, "step", (int, float))
    centers = _axis_option(center, "center", (bool,))
    if isinstance(frames, torch.Tensor):
        if frames.dim() != 1 or frames.dtype == torch.bool or frames.is_complex():
            raise ValueError(f"frames must be an int or a 1-D int/float tensor of frame "
                             f"positions, got {frames.dtype} shape {tuple(frames.shape)}")
        device = frames.device if device is None else torch.device(device)
    elif isinstance(frames, bool) or not isinstance(frames, int) or frames < 0:
        raise ValueError(f"frames must be a non-negative int or a 1-D tensor of frame positions, "
                         f"got {frames!r}")
    floating = (any(isinstance(v, float) for v in starts + steps_)
                or (isinstance(frames, torch.Tensor) and frames.is_floating_point()))
    if dtype is None:
        dtype = torch.float64 if floating else torch.int64
    elif not isinstance(dtype, torch.dtype) or dtype == torch.bool or dtype.is_complex:
        raise TypeError(f"dtype must be an integer or floating-point torch.dtype, got {dtype!r}")
    elif floating and not dtype.is_floating_point:
        raise ValueError(f"dtype {dtype} cannot hold fractional ids: start, step or frames are "
                         f"floating-point; pass a floating dtype or leave dtype=None")
    # Coordinates in float64 (exact for the ints of any real grid) unless ints are asked for.
    work = torch.float64 if dtype.is_floating_point else torch.int64
    axes = []
    for a, n in enumerate((frames, height, width)):
        if isinstance(n, torch.Tensor):
            k = n.to(device=device, dtype=work)
            count = n.shape[0]
        else:
            count = n
            k = torch.arange(n, dtype=work, device=device)
        if centers[a]:
            k = k - (count - count // 2)
        axes.append(starts[a] + steps_[a] * k if (starts[a], steps_[a]) != (0, 1) else k)
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    return grid.reshape(-1, 3).to(dtype)
