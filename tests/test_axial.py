"""Axial RoPE tables for diffusion transformers (rope_ext.axial; docs/math.md section 16,
docs/api.md section 13).

Checked against a float64 reference written here from docs/math.md section 16.1, and against
the table builders of diffusers itself (Flux, Flux 2, Wan, HunyuanVideo and its Framepack,
CogVideoX, LTX-Video, Qwen-Image, Cosmos), each converted from its [.., r] repeated or complex
form to one value per pair; the rotation against diffusers' own apply functions; the grid
helper against the grids those models build; bad input; and the no-sync promise under
torch.compile(fullgraph=True). diffusers is a test dependency only.
"""

import math

import pytest
import torch

import reference as ref
import rope_ext
from rope_ext.axial import axial_cos_sin, axial_inv_freq, ltx_video_cos_sin, video_grid_ids

pytest.importorskip("diffusers")

from diffusers.models.embeddings import apply_rotary_emb, get_1d_rotary_pos_embed  # noqa: E402
from diffusers.models.embeddings import get_3d_rotary_pos_embed  # noqa: E402

U = 2.0 ** -24  # float32 unit roundoff (half the spacing of the numbers just below 1)
CPU = torch.device("cpu")

# --- the independent float64 reference (docs/math.md section 16.1) ---


def ref_angles(ids, axes_dim, theta=10000.0, linear=1.0, ntk=1.0):
    """angle[..., p] = ids[..., a] * (theta_a ntk_a)^(-2j/d_a) / linear_a, pair p = (axis a, j),
    frequencies from Python doubles, one column per pair (no library code shared)."""
    n = len(axes_dim)
    per = lambda v: list(v) if isinstance(v, (list, tuple)) else [v] * n  # noqa: E731
    theta, linear, ntk = per(theta), per(linear), per(ntk)
    cols = []
    for a, d in enumerate(axes_dim):
        for j in range(d // 2):
            w = (theta[a] * ntk[a]) ** (-(2 * j) / d) / linear[a]
            cols.append(ids[..., a].double() * w)
    return torch.stack(cols, dim=-1)


def exponent_error(axes_dim):
    """|fl32(2j/d) - 2j/d| of every pair: diffusers rounds the exponent to float32."""
    return torch.cat([ref.hf_exponent_error(d) for d in axes_dim])


def float32_table_bound(angle, axes_dim, theta=10000.0, ntk=1.0):
    """How far a table computed in float32 (diffusers' default freqs_dtype) may be from the
    exact one, per value (docs/math.md section 16.3):

        U * (|angle| * (8 + ln(theta_a ntk_a) * |fl32(2j/d) - 2j/d| / U) + 4)

    The angle term: the exponent's float32 rounding moves theta^e by ln(theta) times it,
    relatively; pow, the reciprocal, the product with the position and the position itself
    (a float32 grid) lose up to 8 units more. The 4: float32 cos/sin of that angle (SLEEF,
    within 1 ulp) and our own rounding of the exact value."""
    n = len(axes_dim)
    per = lambda v: list(v) if isinstance(v, (list, tuple)) else [v] * n  # noqa: E731
    log_base = torch.cat([torch.full((d // 2,), math.log(t * k), dtype=torch.float64)
                          for d, t, k in zip(axes_dim, per(theta), per(ntk))])
    rel = 8 + log_base * exponent_error(axes_dim) / U
    return U * (angle.abs() * rel + 4)


def pairs_of_interleaved(t):
    """diffusers' repeat-interleaved [.., r] table ([c0, c0, c1, c1, ...]) as [.., r/2]."""
    assert torch.equal(t[..., 0::2], t[..., 1::2]), "not a repeat-interleaved table"
    return t[..., 0::2]


def pairs_of_halves(t):
    """A [.., r] table made of two equal halves ([c0 .. c_{r/2-1}] twice) as [.., r/2]."""
    half = t.shape[-1] // 2
    assert torch.equal(t[..., :half], t[..., half:]), "not a duplicated-halves table"
    return t[..., :half]


def assert_within(ours, theirs, bound, what):
    err = (ours.double() - theirs.double()).abs()
    bad = ~(err <= bound)
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} of {bad.numel()} values off; worst err {err.max().item():.3g}, "
        f"worst err/bound {(err / bound).max().item():.3g}")
    return err.max().item()


def assert_tables(ours, theirs, bound, what):
    """ours and theirs are (cos, sin) pairs of the same shape."""
    for o, t, name in zip(ours, theirs, ("cos", "sin")):
        assert o.shape == t.shape, (what, name, o.shape, t.shape)
        assert_within(o, t, bound, f"{what} {name}")


# --- against the float64 reference ---


@pytest.mark.parametrize("axes_dim,theta,linear,ntk", [
    ((16, 56, 56), 10000.0, 1.0, 1.0),               # Flux
    ((44, 42, 42), 10000.0, 1.0, 1.0),               # Wan 2.1 (head_dim 128)
    ((16, 56, 56), 256.0, 1.0, 1.0),                 # HunyuanVideo
    ((32, 32, 32, 32), 2000.0, 1.0, 1.0),            # Flux 2
    ((44, 42, 42), 10000.0, 1.0, (2.0 ** (44 / 42), 1.0, 1.0)),   # Cosmos, NTK on frames
    ((8, 24), (100.0, 5000.0), (2.0, 0.5), 4.0),     # per-axis theta and linear factor
    ((0, 6, 2), 10000.0, 1.0, 1.0),                  # an axis that rotates nothing
])
def test_matches_float64_reference(axes_dim, theta, linear, ntk):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(-300, 3000, (2, 50, len(axes_dim)), generator=g)
    ids[0, 0] = 2 ** 20  # large positions: the float64 angle stays exact to float32
    angle = ref_angles(ids, axes_dim, theta, linear, ntk)
    c64, s64 = torch.cos(angle), torch.sin(angle)
    cos, sin = axial_cos_sin(ids, axes_dim, theta, linear_factor=linear, ntk_factor=ntk)
    assert cos.dtype == sin.dtype == torch.float32
    assert cos.shape == sin.shape == (2, 50, sum(axes_dim) // 2)
    # One rounding of a float64 value: within one float32 ulp of the reference (the two
    # float64 angles differ by a few units of 2^-53 * angle, far below that).
    assert_within(cos, c64, ref.ulp32(c64) + 2.0 ** -52 * (angle.abs() + 1), "cos")
    assert_within(sin, s64, ref.ulp32(s64) + 2.0 ** -52 * (angle.abs() + 1), "sin")
    # float64 tables: the frequencies come from torch's pow and Python's, a few ulps apart.
    cd, sd = axial_cos_sin(ids, axes_dim, theta, dtype=torch.float64, linear_factor=linear,
                           ntk_factor=ntk)
    assert cd.dtype == torch.float64
    tol = 8 * 2.0 ** -53 * (angle.abs() + 1)
    assert_within(cd, c64, tol, "cos float64")
    assert_within(sd, s64, tol, "sin float64")


def test_float_ids_and_other_dtypes():
    ids = torch.tensor([[0.5, -3.25, 17.0], [1e-3, 2.0, 1234.5]], dtype=torch.float64)
    angle = ref_angles(ids, (4, 6, 2))
    for id_dtype in (torch.float64, torch.float32, torch.int32, torch.bfloat16):
        x = ids.to(id_dtype)
        a = ref_angles(x, (4, 6, 2))
        cos, sin = axial_cos_sin(x, (4, 6, 2))
        assert_within(cos, torch.cos(a), ref.ulp32(torch.cos(a)), f"cos {id_dtype}")
        assert_within(sin, torch.sin(a), ref.ulp32(torch.sin(a)), f"sin {id_dtype}")
    for dtype in (torch.bfloat16, torch.float16):
        cos, sin = axial_cos_sin(ids, (4, 6, 2), dtype=dtype)
        assert cos.dtype == sin.dtype == dtype
        # Rounded once from float64: within half a spacing of the dtype (eps / 2 relative).
        eps = torch.finfo(dtype).eps
        assert_within(cos, torch.cos(angle), eps * torch.cos(angle).abs() / 2 + 1e-7, "cos")
        assert_within(sin, torch.sin(angle), eps * torch.sin(angle).abs() / 2 + 1e-7, "sin")


def test_inv_freq_is_per_axis():
    inv = axial_inv_freq((4, 6), (100.0, 10.0), linear_factor=(1.0, 2.0), ntk_factor=(3.0, 1.0))
    want = [300.0 ** (-0 / 4), 300.0 ** (-2 / 4), 1.0 / 2, 10.0 ** (-2 / 6) / 2,
            10.0 ** (-4 / 6) / 2]
    assert inv.dtype == torch.float64 and inv.shape == (5,)
    assert torch.allclose(inv, torch.tensor(want, dtype=torch.float64), rtol=4 * 2.0 ** -53,
                          atol=0)


def test_shapes_and_shared_ids():
    ids = video_grid_ids(2, 3, 4)
    cos, sin = axial_cos_sin(ids, (8, 12, 12))
    assert cos.shape == (24, 16)
    one_c, _ = axial_cos_sin(ids[5], (8, 12, 12))  # a single token [n_axes] -> [r/2]
    assert one_c.shape == (16,) and torch.equal(one_c, cos[5])
    empty_c, empty_s = axial_cos_sin(ids[:0], (8, 12, 12))
    assert empty_c.shape == empty_s.shape == (0, 16)
    # A batch of equal rows made with expand (stride 0) is built once and comes back expanded.
    batch = ids.expand(5, -1, -1)
    bc, bs = axial_cos_sin(batch, (8, 12, 12))
    assert bc.shape == (5, 24, 16) and bc.stride(0) == 0 and bs.stride(0) == 0
    assert torch.equal(bc, cos.expand(5, -1, -1)) and torch.equal(bs, sin.expand(5, -1, -1))
    # Materialized equal rows are computed row by row and give the same bits.
    full_c, _ = axial_cos_sin(batch.contiguous(), (8, 12, 12))
    assert full_c.stride(0) != 0 and torch.equal(full_c, bc)
    # The op takes the shared [N, r/2] table for every sequence of a batch, and the expanded one.
    x = torch.randn(5, 24, 2, 40)
    shared = rope_ext.apply_rope(x, cos, sin, interleaved=True)
    expanded = rope_ext.apply_rope(x, bc, bs, interleaved=True)
    assert torch.equal(shared, expanded)
    ref.assert_pairs_close(shared, ref.rope(x, cos, sin, interleaved=True), x, 32, True)


def test_never_imports_diffusers():
    import subprocess
    import sys

    code = ("import sys, torch, rope_ext, rope_ext.axial as ax; "
            "ax.axial_cos_sin(ax.video_grid_ids(1, 2, 2), (2, 2, 2)); "
            "assert 'diffusers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_exported_from_package():
    if not hasattr(rope_ext, "axial_cos_sin"):
        pytest.skip("rope_ext/__init__.py does not export axial_cos_sin yet")
    assert rope_ext.axial_cos_sin is axial_cos_sin


# --- against diffusers' own tables ---


def test_flux_pos_embed_float64_family():
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    # Flux's ids: text tokens at (0, 0, 0), then the image grid (0, h, w) (pipeline's
    # _prepare_latent_image_ids), here at 32 x 48 latent patches.
    ids = torch.cat([torch.zeros(64, 3), video_grid_ids(1, 32, 48).float()])
    theirs = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(ids)
    ours = axial_cos_sin(ids, (16, 56, 56))
    theirs = tuple(pairs_of_interleaved(t) for t in theirs)
    # Both compute in float64 and round once: equal up to one float32 ulp (U for values below
    # 1) where the two float64 values straddle a rounding boundary; measured: bit for bit.
    assert_tables(ours, theirs, U, "Flux")
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def test_flux2_pos_embed_four_axes():
    from diffusers.models.transformers.transformer_flux2 import Flux2PosEmbed

    ids = torch.cat([torch.stack([torch.zeros(40), torch.zeros(40), torch.zeros(40),
                                  torch.arange(40.)], -1),
                     torch.cat([video_grid_ids(1, 16, 24), torch.zeros(384, 1)], -1)])
    theirs = Flux2PosEmbed(theta=2000, axes_dim=[32, 32, 32, 32])(ids)
    ours = axial_cos_sin(ids, (32, 32, 32, 32), 2000.0)
    assert_tables(ours, tuple(pairs_of_interleaved(t) for t in theirs), U, "Flux 2")


def test_wan_rotary_pos_embed():
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    rope = WanRotaryPosEmbed(attention_head_dim=128, patch_size=(1, 2, 2), max_seq_len=1024)
    frames, height, width = 5, 12, 20  # latent [B, C, 5, 24, 40], patches (1, 2, 2)
    theirs = rope(torch.zeros(1, 1, frames, 2 * height, 2 * width))  # [1, N, 1, 128] each
    axes = (rope.t_dim, rope.h_dim, rope.w_dim)
    assert axes == (44, 42, 42)
    ours = axial_cos_sin(video_grid_ids(frames, height, width), axes)
    theirs = tuple(pairs_of_interleaved(t[0, :, 0]) for t in theirs)
    # float64 freqs unless an MPS backend is available (then float32, as HunyuanVideo's).
    assert_tables(ours, theirs, U, "Wan")


@pytest.mark.parametrize("framepack", [False, True])
def test_hunyuan_video_rotary_pos_embed(framepack):
    from diffusers.models.transformers import transformer_hunyuan_video as hv
    from diffusers.models.transformers import transformer_hunyuan_video_framepack as fp

    axes = (16, 56, 56)  # HunyuanVideo's rope_axes_dim, theta 256
    if framepack:
        frame_indices = torch.tensor([0, 1, 2, 9, 10, 17])
        rope = fp.HunyuanVideoFramepackRotaryPosEmbed(2, 1, list(axes), 256.0)
        theirs = rope(frame_indices, 2 * 15, 2 * 26, CPU)
        ids = video_grid_ids(frame_indices, 15, 26)
    else:
        rope = hv.HunyuanVideoRotaryPosEmbed(2, 1, list(axes), 256.0)
        theirs = rope(torch.zeros(1, 1, 9, 2 * 15, 2 * 26))
        ids = video_grid_ids(9, 15, 26)
    ours = axial_cos_sin(ids, axes, 256.0)
    bound = float32_table_bound(ref_angles(ids, axes, 256.0), axes, 256.0)
    assert_tables(ours, tuple(pairs_of_interleaved(t) for t in theirs), bound, "HunyuanVideo")


def _cogvideox_crop(grid_h, grid_w, base_w, base_h):
    """The crop region CogVideoX's pipeline computes (get_resize_crop_region_for_grid): the
    grid resized to cover the base grid's aspect, centred. Written from its description."""
    if grid_h / grid_w > base_h / base_w:
        rh, rw = base_h, int(round(base_h / grid_h * grid_w))
    else:
        rw, rh = base_w, int(round(base_w / grid_w * grid_h))
    top, left = int(round((base_h - rh) / 2.0)), int(round((base_w - rw) / 2.0))
    return (top, left), (top + rh, left + rw)


@pytest.mark.parametrize("grid", [(30, 45), (30, 40), (60, 90)])
def test_cogvideox_linspace_grid(grid):
    # CogVideoX 1.0: attention_head_dim 64 -> axes (16, 24, 24); base grid 60 x 90 (480 x 720
    # pixels over the VAE's 8 and the patch's 2). A smaller grid covers the base crop with
    # linspace(start, stop * (n - 1) / n, n): fractional positions on a grid of another aspect.
    gh, gw = grid
    (top, left), (bottom, right) = _cogvideox_crop(gh, gw, 90, 60)
    theirs = get_3d_rotary_pos_embed(64, ((top, left), (bottom, right)), (gh, gw), 7)
    step_h = (bottom * (gh - 1) / gh - top) / (gh - 1)
    step_w = (right * (gw - 1) / gw - left) / (gw - 1)
    ids = video_grid_ids(7, gh, gw, start=(0, top, left), step=(1, step_h, step_w))
    axes = (16, 24, 24)
    ours = axial_cos_sin(ids, axes)
    bound = float32_table_bound(ref_angles(ids, axes), axes)
    assert_tables(ours, tuple(pairs_of_interleaved(t) for t in theirs), bound, "CogVideoX")


def test_cogvideox_15_slice_grid():
    theirs = get_3d_rotary_pos_embed(64, None, (20, 30), 4, grid_type="slice", max_size=(60, 90))
    ids = video_grid_ids(4, 20, 30)
    ours = axial_cos_sin(ids, (16, 24, 24))
    bound = float32_table_bound(ref_angles(ids, (16, 24, 24)), (16, 24, 24))
    assert_tables(ours, tuple(pairs_of_interleaved(t) for t in theirs), bound, "CogVideoX 1.5")


def test_qwen_image_centered_grid_and_text():
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    axes = (16, 56, 56)
    rope = QwenEmbedRope(theta=10000, axes_dim=list(axes), scale_rope=True)
    # Two images (an edit: the second is image index 1) and 77 text tokens.
    shapes = [(1, 32, 24), (1, 17, 21)]
    vid, txt = rope([shapes], device=CPU, max_txt_seq_len=77)
    ids = torch.cat([video_grid_ids(f, h, w, start=(i, 0, 0), center=(False, True, True))
                     for i, (f, h, w) in enumerate(shapes)])
    # Text tokens sit on the diagonal (m, m, m) after the largest image half-size.
    first = max(max(h // 2, w // 2) for _, h, w in shapes)
    m = torch.arange(first, first + 77)
    text_ids = torch.stack([m, m, m], dim=-1)
    for name, got, token_ids in (("image", vid, ids), ("text", txt, text_ids)):
        assert got.dtype == torch.complex64
        ours = axial_cos_sin(token_ids, axes)
        bound = float32_table_bound(ref_angles(token_ids, axes), axes)
        assert_tables(ours, (got.real, got.imag), bound, f"Qwen-Image {name}")


def test_cosmos_per_axis_ntk_half_split():
    from diffusers.models.transformers.transformer_cosmos import CosmosRotaryPosEmbed

    rope = CosmosRotaryPosEmbed(hidden_size=128, max_size=(128, 240, 240), patch_size=(1, 2, 2),
                                rope_scale=(2.0, 1.0, 1.0))
    axes = (rope.dim_t, rope.dim_h, rope.dim_w)
    assert axes == (44, 42, 42)
    ntk = [2.0 ** (44 / 42), 1.0, 1.0]  # rope_scale ** (d / (d - 2)) per axis
    frames, height, width = 6, 11, 20
    for fps in (None, 30):
        theirs = rope(torch.zeros(1, 1, frames, 2 * height, 2 * width), fps=fps)
        step = (1 if fps is None else 24 / fps, 1, 1)  # base_fps 24
        ids = video_grid_ids(frames, height, width, step=step)
        ours = axial_cos_sin(ids, axes, ntk_factor=ntk)
        bound = float32_table_bound(ref_angles(ids, axes, ntk=ntk), axes, ntk=ntk)
        # Cosmos' tables hold the pairs twice ([t, h, w] * 2): the half-split form.
        assert_tables(ours, tuple(pairs_of_halves(t) for t in theirs), bound, f"Cosmos fps={fps}")


@pytest.mark.parametrize("linear,ntk", [(4.0, 1.0), (1.0, 3.5), (2.0, 2.0)])
def test_linear_and_ntk_factors_match_get_1d_rotary_pos_embed(linear, ntk):
    pos = torch.arange(0, 700, 7)
    theirs = get_1d_rotary_pos_embed(24, pos, 10000.0, use_real=True, linear_factor=linear,
                                     ntk_factor=ntk, freqs_dtype=torch.float64)
    ours = axial_cos_sin(pos[:, None], (24,), linear_factor=linear, ntk_factor=ntk)
    assert_tables(ours, tuple(pairs_of_interleaved(t) for t in theirs), U, "get_1d float64")
    # Per axis: axis 1 scaled, axis 0 not, against two diffusers calls side by side.
    ids = torch.stack([pos, pos.flip(0)], dim=-1)
    plain = get_1d_rotary_pos_embed(8, pos, 500.0, use_real=True, freqs_dtype=torch.float64)
    scaled = get_1d_rotary_pos_embed(24, pos.flip(0), 10000.0, use_real=True,
                                     linear_factor=linear, ntk_factor=ntk,
                                     freqs_dtype=torch.float64)
    ours = axial_cos_sin(ids, (8, 24), (500.0, 10000.0), linear_factor=(1.0, linear),
                         ntk_factor=(1.0, ntk))
    theirs = tuple(pairs_of_interleaved(torch.cat([p, s], -1)) for p, s in zip(plain, scaled))
    assert_tables(ours, theirs, U, "per-axis factors")


def ltx_angles(coords, dim, theta=10000.0):
    """LTX-Video's angles from their description (docs/math.md section 16.2), float64."""
    n = dim // 6
    f = torch.tensor([theta ** (j / (n - 1)) * math.pi / 2 for j in range(n)], dtype=torch.float64)
    ang = ((2 * coords.double() - 1).unsqueeze(-2) * f[:, None]).flatten(-2)
    pad = torch.zeros(ang.shape[:-1] + ((dim % 6) // 2,), dtype=torch.float64)
    freq = torch.cat([torch.zeros((dim % 6) // 2, dtype=torch.float64), f.repeat_interleave(3)])
    return torch.cat([pad, ang], dim=-1), freq


def test_ltx_video_rotary_pos_embed():
    from diffusers.models.transformers.transformer_ltx import LTXVideoRotaryPosEmbed

    dim = 2048  # 32 heads x 64: 2048 % 6 = 2, one identity pair in front
    rope = LTXVideoRotaryPosEmbed(dim, base_num_frames=20, base_height=2048, base_width=2048,
                                  patch_size=1, patch_size_t=1, theta=10000.0)
    frames, height, width = 4, 8, 12
    scale = (20 / 25 * 8, 32.0, 32.0)  # the pipeline's (vae temporal / frame_rate, vae spatial)
    theirs = rope(torch.zeros(2, 1, dim), frames, height, width, scale)  # [2, N, dim] each
    # The grid helper gives LTX's fractional coordinates: k * scale * patch / base per axis.
    coords = video_grid_ids(frames, height, width,
                            step=(scale[0] / 20, scale[1] / 2048, scale[2] / 2048))
    diffusers_coords = rope._prepare_video_coords(2, frames, height, width, scale, CPU)
    assert diffusers_coords.shape == (2, frames * height * width, 3)
    assert_within(coords, diffusers_coords[0], 4 * U * coords.abs(), "LTX coords")
    ours = ltx_video_cos_sin(diffusers_coords, dim)
    assert ours[0].shape == (2, frames * height * width, dim // 2)
    angle, freq = ltx_angles(diffusers_coords, dim)
    # Float64 reference: one rounding.
    assert_within(ours[0], torch.cos(angle), ref.ulp32(torch.cos(angle)), "LTX cos vs reference")
    assert_within(ours[1], torch.sin(angle), ref.ulp32(torch.sin(angle)), "LTX sin vs reference")
    # LTX computes in float32 with angles up to theta * pi / 2 * |2g - 1|: a float32 table
    # is off by U * (|angle| (2 ln theta + 4) + f_j + 4) (docs/math.md section 16.3).
    bound = U * (angle.abs() * (2 * math.log(10000.0) + 4) + freq + 4)
    assert_tables(ours, tuple(pairs_of_interleaved(t) for t in theirs), bound, "LTX")
    assert bool((ours[0][..., 0] == 1).all() and (ours[1][..., 0] == 0).all())
    # The shared grid gives the batch's table once.
    shared = ltx_video_cos_sin(coords, dim)
    assert shared[0].shape == (frames * height * width, dim // 2)


# --- the rotation against diffusers' apply functions ---


def _diffusers_rot_bound(x, table_err, dtype):
    """Per element of a pair with norm rho: each side is within a few roundings of the exact
    rotation by its own table (diffusers: x cos, x_rot sin and their sum in float32, then one
    rounding to x's dtype; the op: float32 math, one rounding), and the tables differ by
    table_err per value, which moves an element by at most sqrt(2) table_err rho."""
    k = 8 * U if dtype == torch.float32 else 2 * 2.0 ** -8 + 8 * U
    return k, math.sqrt(2) * table_err


def assert_rotation_close(ours, theirs, x, table_bound, interleaved):
    r = x.shape[-1]
    ia, ib = ref.pair_slots(r, interleaved)
    rho = ref.pair_norms(x, r, interleaved)
    k, t = _diffusers_rot_bound(x, table_bound, x.dtype)
    bound = (k + t) * rho + 1e-30
    o, th = ours.double(), theirs.double()
    err = torch.maximum((o[..., ia] - th[..., ia]).abs(), (o[..., ib] - th[..., ib]).abs())
    bad = ~(err <= bound)
    assert not bool(bad.any()), f"{int(bad.sum())} pairs off; worst err/rho {(err / rho).max():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotation_interleaved_matches_apply_rotary_emb(dtype):
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed
    from diffusers.models.transformers import transformer_hunyuan_video as hv

    g = torch.Generator().manual_seed(2)
    # Flux: x [B, S, H, D], sequence_dim=1, tables bit-identical to ours.
    ids = torch.cat([torch.zeros(8, 3), video_grid_ids(1, 6, 10).float()])
    freqs = FluxPosEmbed(10000, [16, 56, 56])(ids)
    cos, sin = axial_cos_sin(ids, (16, 56, 56))
    x = torch.randn(2, ids.shape[0], 3, 128, generator=g).to(dtype)
    theirs = apply_rotary_emb(x, freqs, use_real=True, sequence_dim=1)
    ours = rope_ext.apply_rope(x, cos, sin, interleaved=True)
    assert ours.dtype == dtype
    assert_rotation_close(ours, theirs, x, torch.full(cos.shape, U)[None, :, None], True)
    # HunyuanVideo's float32 tables, x [B, H, S, D] (diffusers' default sequence_dim=2);
    # a head_dim above r leaves a tail the op passes through, so give it exactly r.
    freqs = hv.HunyuanVideoRotaryPosEmbed(1, 1, [16, 56, 56], 256.0)(torch.zeros(1, 1, 3, 5, 7))
    ids = video_grid_ids(3, 5, 7)
    cos, sin = axial_cos_sin(ids, (16, 56, 56), 256.0)
    tb = float32_table_bound(ref_angles(ids, (16, 56, 56), 256.0), (16, 56, 56), 256.0)
    x = torch.randn(2, 4, ids.shape[0], 128, generator=g).to(dtype)
    theirs = apply_rotary_emb(x, freqs, use_real=True)
    ours = rope_ext.apply_rope(x, cos, sin, interleaved=True, layout="bhsd")
    assert_rotation_close(ours, theirs, x, tb[None, None], True)


def test_rotation_half_split_matches_use_real_unbind_dim_minus_2():
    from diffusers.models.transformers.transformer_cosmos import CosmosRotaryPosEmbed

    rope = CosmosRotaryPosEmbed(hidden_size=128, rope_scale=(2.0, 1.0, 1.0))
    freqs = rope(torch.zeros(1, 1, 3, 2 * 4, 2 * 6))
    ntk = [2.0 ** (44 / 42), 1.0, 1.0]
    ids = video_grid_ids(3, 4, 6)
    cos, sin = axial_cos_sin(ids, (44, 42, 42), ntk_factor=ntk)
    tb = float32_table_bound(ref_angles(ids, (44, 42, 42), ntk=ntk), (44, 42, 42), ntk=ntk)
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 4, ids.shape[0], 128, generator=g).to(dtype)  # Cosmos: [B, H, S, D]
        theirs = apply_rotary_emb(x, freqs, use_real=True, use_real_unbind_dim=-2)
        ours = rope_ext.apply_rope(x, cos, sin, interleaved=False, layout="bhsd")
        assert_rotation_close(ours, theirs, x, tb[None, None], False)


def test_rotation_complex_qwen_and_ltx():
    from diffusers.models.transformers.transformer_ltx import LTXVideoRotaryPosEmbed
    from diffusers.models.transformers.transformer_ltx import apply_rotary_emb as ltx_apply
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    g = torch.Generator().manual_seed(4)
    vid, _ = QwenEmbedRope(10000, [16, 56, 56], scale_rope=True)([(1, 6, 8)], device=CPU,
                                                                max_txt_seq_len=1)
    ids = video_grid_ids(1, 6, 8, center=(False, True, True))
    cos, sin = axial_cos_sin(ids, (16, 56, 56))
    tb = float32_table_bound(ref_angles(ids, (16, 56, 56)), (16, 56, 56))
    x = torch.randn(2, ids.shape[0], 3, 128, generator=g)  # Qwen-Image: [B, S, H, D]
    theirs = apply_rotary_emb_qwen(x, vid, use_real=False)
    ours = rope_ext.apply_rope(x, cos, sin, interleaved=True)
    assert_rotation_close(ours, theirs, x, tb[None, :, None], True)
    # LTX: the whole [B, S, dim] projection is one rotated vector (one "head" of dim).
    dim = 384
    rope = LTXVideoRotaryPosEmbed(dim, 20, 2048, 2048, 1, 1, 10000.0)
    freqs = rope(torch.zeros(1, 1, dim), 2, 3, 4, (0.32, 32.0, 32.0))
    coords = rope._prepare_video_coords(1, 2, 3, 4, (0.32, 32.0, 32.0), CPU)[0]
    cos, sin = ltx_video_cos_sin(coords, dim)
    angle, freq = ltx_angles(coords, dim)
    tb = U * (angle.abs() * (2 * math.log(10000.0) + 4) + freq + 4)
    x = torch.randn(2, coords.shape[0], dim, generator=g)
    theirs = ltx_apply(x, freqs)
    ours = rope_ext.apply_rope(x.unflatten(-1, (1, dim)), cos, sin, interleaved=True).flatten(-2)
    assert_rotation_close(ours.unflatten(-1, (1, dim)), theirs.unflatten(-1, (1, dim)),
                          x.unflatten(-1, (1, dim)), tb[None, :, None], True)


# --- the grid helper ---


def test_video_grid_ids_layout():
    ids = video_grid_ids(2, 3, 4)
    assert ids.dtype == torch.int64 and ids.shape == (24, 3)
    f, h, w = torch.meshgrid(torch.arange(2), torch.arange(3), torch.arange(4), indexing="ij")
    assert torch.equal(ids, torch.stack([f, h, w], -1).reshape(-1, 3))
    # Flux's image ids (the pipeline's _prepare_latent_image_ids): (0, h, w), width fastest.
    flux = video_grid_ids(1, 3, 5)
    assert flux[:, 0].eq(0).all() and torch.equal(flux[:6, 2], torch.tensor([0, 1, 2, 3, 4, 0]))
    # Qwen-Image's scale_rope: rows -(n - n//2) .. n//2 - 1.
    q = video_grid_ids(1, 5, 4, center=(False, True, True))
    assert q[:, 1].unique().tolist() == [-3, -2, -1, 0, 1]
    assert q[:, 2].unique().tolist() == [-2, -1, 0, 1]
    # start and step per axis; a float step makes float64 ids.
    s = video_grid_ids(2, 1, 2, start=(3, 0, 10), step=(0.5, 1, 2))
    assert s.dtype == torch.float64
    assert s.tolist() == [[3.0, 0.0, 10.0], [3.0, 0.0, 12.0], [3.5, 0.0, 10.0], [3.5, 0.0, 12.0]]
    # frames as a tensor of positions (Framepack's frame_indices).
    fi = video_grid_ids(torch.tensor([0, 4, 9]), 1, 1)
    assert fi[:, 0].tolist() == [0, 4, 9] and fi.dtype == torch.int64
    assert video_grid_ids(0, 3, 4).shape == (0, 3)
    assert video_grid_ids(2, 2, 2, dtype=torch.float32).dtype == torch.float32


# --- no host sync ---


def test_builds_under_compile_fullgraph_same_bits():
    # fullgraph=True fails on any graph break, which a .item(), a host read of a device value
    # or data-dependent control flow would cause; aot_eager runs the same ATen ops, so the
    # bits must match eager's.
    def build(ids, coords):
        c, s = axial_cos_sin(ids, (16, 56, 56), (10000.0, 500.0, 500.0), ntk_factor=(2.0, 1, 1))
        lc, ls = ltx_video_cos_sin(coords, 128)
        return c, s, lc, ls

    compiled = torch.compile(build, fullgraph=True, backend="aot_eager")
    ids = torch.cat([torch.zeros(7, 3, dtype=torch.int64), video_grid_ids(2, 5, 6)])
    coords = video_grid_ids(2, 3, 4, step=(0.1, 0.01, 0.01))
    for got, want in zip(compiled(ids, coords), build(ids, coords)):
        ref.assert_bit_identical(got, want, "compiled table")
    grid = torch.compile(lambda: video_grid_ids(3, 4, 5, start=(1, 0, 0),
                                                center=(False, True, True)),
                         fullgraph=True, backend="aot_eager")
    assert torch.equal(grid(), video_grid_ids(3, 4, 5, start=(1, 0, 0),
                                              center=(False, True, True)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_no_sync_and_same_values():
    ids = video_grid_ids(4, 16, 16, device="cuda")
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call raises
    try:
        cos, sin = axial_cos_sin(ids, (16, 56, 56))
        lc, _ = ltx_video_cos_sin(video_grid_ids(2, 4, 4, step=0.01, device="cuda"), 2048)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    c_cpu, s_cpu = axial_cos_sin(ids.cpu(), (16, 56, 56))
    assert cos.device.type == "cuda" and lc.device.type == "cuda"
    assert_within(cos.cpu(), c_cpu, U, "cuda cos")
    assert_within(sin.cpu(), s_cpu, U, "cuda sin")


# --- bad input ---


@pytest.mark.parametrize("call,exc,word", [
    (lambda: axial_cos_sin(torch.zeros(4, 3), (16, 55, 56)), ValueError, "axes_dim"),
    (lambda: axial_cos_sin(torch.zeros(4, 3), (16, -2, 56)), ValueError, "axes_dim"),
    (lambda: axial_cos_sin(torch.zeros(4, 3), (16, 56.0, 56)), ValueError, "axes_dim"),
    (lambda: axial_cos_sin(torch.zeros(4, 3), ()), ValueError, "axes_dim"),
    (lambda: axial_cos_sin(torch.zeros(4, 3), 16), ValueError, "axes_dim"),
    (lambda: axial_cos_sin(torch.zeros(4, 2), (16, 56, 56)), ValueError, "ids"),
    (lambda: axial_cos_sin(torch.zeros(()), (16,)), ValueError, "ids"),
    (lambda: axial_cos_sin([[0, 1, 2]], (16, 56, 56)), TypeError, "ids"),
    (lambda: axial_cos_sin(torch.zeros(4, 3, dtype=torch.bool), (2, 2, 2)), TypeError, "ids"),
    (lambda: axial_cos_sin(torch.zeros(4, 3, dtype=torch.complex64), (2, 2, 2)), TypeError, "ids"),
    (lambda: axial_cos_sin(torch.zeros(4, 3), (2, 2, 2), (1e4, 1e4)), ValueError, "theta"),
    (lambda: axial_cos_sin(torch.zeros(4, 3), (2, 2, 2), -1.0), ValueError, "theta"),
    (lambda: axial_cos_sin(torch.zeros(4, 3), (2, 2, 2), float("inf")), ValueError, "theta"),
    (lambda: axial_cos_sin(torch.zeros(4, 3), (2, 2, 2), torch.tensor(1e4)), TypeError, "theta"),
    (lambda: axial_cos_sin(torch.zeros(4, 3), (2, 2, 2), "1e4"), TypeError, "theta"),
    (lambda: axial_cos_sin(torch.zeros(4, 3), (2, 2, 2), dtype=torch.int32), TypeError, "dtype"),
    (lambda: axial_cos_sin(torch.zeros(4, 3), (2, 2, 2), dtype="float32"), TypeError, "dtype"),
    (lambda: axial_cos_sin(torch.zeros(4, 3), (2, 2, 2), linear_factor=0.0), ValueError,
     "linear_factor"),
    (lambda: axial_cos_sin(torch.zeros(4, 3), (2, 2, 2), ntk_factor=(1, 2)), ValueError,
     "ntk_factor"),
    (lambda: ltx_video_cos_sin(torch.zeros(4, 3), 2047), ValueError, "dim"),
    (lambda: ltx_video_cos_sin(torch.zeros(4, 2), 2048), ValueError, "coords"),
    (lambda: ltx_video_cos_sin(torch.zeros(4, 3), 2048, (1e4, 1e4, 1e4)), TypeError, "theta"),
    (lambda: ltx_video_cos_sin(torch.zeros(4, 3), 2048, 0.0), ValueError, "theta"),
    (lambda: ltx_video_cos_sin(torch.zeros(4, 3), 2048, dtype=torch.int64), TypeError, "dtype"),
    (lambda: video_grid_ids(-1, 2, 2), ValueError, "frames"),
    (lambda: video_grid_ids(2.0, 2, 2), ValueError, "frames"),
    (lambda: video_grid_ids(torch.zeros(2, 2), 2, 2), ValueError, "frames"),
    (lambda: video_grid_ids(2, 2.5, 2), ValueError, "height"),
    (lambda: video_grid_ids(2, 2, -3), ValueError, "width"),
    (lambda: video_grid_ids(2, 2, 2, start=(0, 0)), ValueError, "start"),
    (lambda: video_grid_ids(2, 2, 2, step=float("nan")), ValueError, "step"),
    (lambda: video_grid_ids(2, 2, 2, center=1), TypeError, "center"),
    (lambda: video_grid_ids(2, 2, 2, step=0.5, dtype=torch.int64), ValueError, "dtype"),
    (lambda: video_grid_ids(2, 2, 2, dtype=torch.bool), TypeError, "dtype"),
])
def test_bad_input_names_the_argument(call, exc, word):
    with pytest.raises(exc, match=word):
        call()
