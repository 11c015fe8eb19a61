"""rope_ext.diffusers: diffusers' RoPE (and QK-norm + RoPE) on rope_ext's ops.

Checked against the installed diffusers (0.42.1), on tiny random transformers of each family
(built from the model class with tiny config kwargs, seeded):
a) the drop-in functions against diffusers' own, every form (interleaved, half-split and
   complex tables, both sequence_dims, strided x), and the inputs that fall back;
b) each family patched against unpatched: the same output (float32 within 1e-5 of the
   largest element; bf16 as close to the float32 result as diffusers' own bf16 run), the
   same loss and parameter gradients of a training step (norm weights included), and the
   patched functions (or the fused op) really called;
c) a LoRA-style step (frozen base, a trainable adapter on to_q/to_k): the adapter's grads;
d) q/k slices of fused projections are rotated in place (no copy);
e) code that differs from the verified forms is refused and reported;
f) patch() of everything: what is patched, fused and left alone; unpatch() restores the
   exact objects.
The fused processors (hooks, torch.compile) are in tests/test_diffusers_fused.py.
"""

import importlib
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import rope_ext  # noqa: E402
import rope_ext.diffusers as rd  # noqa: E402
from rope_ext.diffusers import _fused, functions  # noqa: E402
from diffusers.models import embeddings as E  # noqa: E402

diffusers.utils.logging.set_verbosity_error()
# Chroma imports FluxPosEmbed from its deprecated home: diffusers' warning, not ours
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

T = "diffusers.models.transformers."


@pytest.fixture(autouse=True)
def _clean_patch_state():
    rd.unpatch()
    yield
    rd.unpatch()


def rel_err(a, b):
    """Largest difference relative to b's largest element."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------
# Tiny models


def _rnd(*shape, g):
    return torch.randn(*shape, generator=g)


def _grid_ids(h, w, axes=3):
    rows = torch.arange(h).float().repeat_interleave(w)
    cols = torch.arange(w).float().repeat(h)
    ids = torch.zeros(h * w, axes)
    ids[:, 1], ids[:, 2] = rows, cols
    return ids


def tiny(fam):
    """(model, forward keyword arguments) of family fam, seeded, every parameter moved off
    its initial value (diffusers zero-initialises output and modulation layers, and norm
    weights start at 1: a mistake in how either is applied would not show)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if fam in ("flux", "chroma"):
        common = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                      attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                      axes_dims_rope=(4, 6, 6))
        if fam == "flux":
            m = diffusers.FluxTransformer2DModel(**common, pooled_projection_dim=12,
                                                 guidance_embeds=True)
        else:
            m = diffusers.ChromaTransformer2DModel(**common, approximator_num_channels=8,
                                                   approximator_hidden_dim=16,
                                                   approximator_layers=1)
        kw = dict(hidden_states=_rnd(2, 12, 4, g=g), encoder_hidden_states=_rnd(2, 5, 24, g=g),
                  timestep=torch.tensor([0.3, 0.7]), img_ids=_grid_ids(3, 4),
                  txt_ids=torch.zeros(5, 3))
        if fam == "flux":
            kw.update(pooled_projections=_rnd(2, 12, g=g), guidance=torch.tensor([3.0, 3.0]))
    elif fam == "flux2":
        m = diffusers.Flux2Transformer2DModel(
            patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=24, timestep_guidance_channels=8,
            axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True)
        kw = dict(hidden_states=_rnd(2, 12, 4, g=g), encoder_hidden_states=_rnd(2, 5, 24, g=g),
                  timestep=torch.tensor([0.3, 0.7]), img_ids=_grid_ids(3, 4, 4),
                  txt_ids=torch.zeros(5, 4), guidance=torch.tensor([3.0, 3.0]))
    elif fam in ("wan", "skyreels_v2"):
        cls = (diffusers.WanTransformer3DModel if fam == "wan"
               else diffusers.SkyReelsV2Transformer3DModel)
        m = cls(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                rope_max_seq_len=32)
        kw = dict(hidden_states=_rnd(2, 4, 2, 4, 4, g=g), timestep=torch.tensor([10, 500]),
                  encoder_hidden_states=_rnd(2, 5, 16, g=g))
    elif fam == "hunyuan_video":
        m = diffusers.HunyuanVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10,
            num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1,
            patch_size_t=1, guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8,
            rope_axes_dim=(2, 4, 4))
        kw = dict(hidden_states=_rnd(2, 4, 2, 3, 4, g=g), timestep=torch.tensor([10, 500]),
                  encoder_hidden_states=_rnd(2, 5, 16, g=g),
                  encoder_attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1] * 5]),
                  pooled_projections=_rnd(2, 8, g=g), guidance=torch.tensor([3000.0, 3000.0]))
    elif fam == "cogvideox":
        m = diffusers.CogVideoXTransformer3DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
            time_embed_dim=8, text_embed_dim=16, num_layers=1, sample_width=8, sample_height=8,
            sample_frames=9, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=5,
            use_rotary_positional_embeddings=True)
        table = E.get_3d_rotary_pos_embed(16, (0, 0), (4, 4), 3, grid_type="slice",
                                          max_size=(4, 4))
        kw = dict(hidden_states=_rnd(2, 3, 4, 8, 8, g=g), encoder_hidden_states=_rnd(2, 5, 16, g=g),
                  timestep=torch.tensor([10, 500]), image_rotary_emb=table)
    elif fam == "ltx":
        m = diffusers.LTXVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12,
            cross_attention_dim=24, num_layers=1, caption_channels=16)
        kw = dict(hidden_states=_rnd(2, 24, 4, g=g), encoder_hidden_states=_rnd(2, 5, 16, g=g),
                  timestep=torch.tensor([10, 500]), encoder_attention_mask=torch.ones(2, 5),
                  num_frames=2, height=3, width=4)
    elif fam == "qwenimage":
        m = diffusers.QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6))
        kw = dict(hidden_states=_rnd(2, 12, 16, g=g), encoder_hidden_states=_rnd(2, 5, 16, g=g),
                  encoder_hidden_states_mask=torch.tensor([[1, 1, 1, 1, 0], [1] * 5]).bool(),
                  timestep=torch.tensor([0.3, 0.7]), img_shapes=[(1, 3, 4)] * 2)
    elif fam == "cosmos":
        m = diffusers.CosmosTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12,
            num_layers=1, text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 8, 8),
            patch_size=(1, 2, 2), concat_padding_mask=False, extra_pos_embed_type=None)
        kw = dict(hidden_states=_rnd(2, 4, 2, 4, 4, g=g), timestep=torch.tensor([0.3, 0.7]),
                  encoder_hidden_states=_rnd(2, 5, 16, g=g), fps=24)
    elif fam == "cogview4":
        m = diffusers.CogView4Transformer2DModel(
            patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=16,
            num_attention_heads=2, text_embed_dim=16, time_embed_dim=8, condition_dim=4,
            pos_embed_max_size=8, sample_size=8, rope_axes_dim=(8, 8))
        size = torch.tensor([[48.0, 64.0]] * 2)
        kw = dict(hidden_states=_rnd(2, 4, 6, 8, g=g), encoder_hidden_states=_rnd(2, 5, 16, g=g),
                  timestep=torch.tensor([10, 500]), original_size=size, target_size=size,
                  crop_coords=torch.zeros(2, 2))
    elif fam == "lumina2":
        m = diffusers.Lumina2Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=1,
            num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16,
            axes_dim_rope=(4, 6, 6), axes_lens=(32, 32, 32), cap_feat_dim=16)
        kw = dict(hidden_states=_rnd(2, 4, 6, 8, g=g), timestep=torch.tensor([0.3, 0.7]),
                  encoder_hidden_states=_rnd(2, 5, 16, g=g),
                  encoder_attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1] * 5]).bool())
    elif fam == "hidream":
        m = diffusers.HiDreamImageTransformer2DModel(
            patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, caption_channels=[16, 16],
            text_emb_dim=16, num_routed_experts=2, num_activated_experts=1,
            axes_dims_rope=(8, 4, 4), max_resolution=(16, 16), llama_layers=[0, 1])
        kw = dict(hidden_states=_rnd(2, 4, 6, 8, g=g), timesteps=torch.tensor([10, 500]),
                  encoder_hidden_states_t5=_rnd(2, 5, 16, g=g),
                  encoder_hidden_states_llama3=_rnd(2, 2, 3, 16, g=g),
                  pooled_embeds=_rnd(2, 16, g=g))
    else:
        raise KeyError(fam)
    with torch.no_grad():
        gp = torch.Generator().manual_seed(2)
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gp))
    return m, kw


def output(model, kw):
    return model(**kw, return_dict=False)[0]


def train_step(model, kw):
    """(output, {parameter name: gradient}) of a loss that weighs every output element."""
    model.zero_grad(set_to_none=True)
    out = output(model, kw)
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
    (out * w).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return out.detach(), grads


def assert_grads_close(ours, ref, rel=1e-5):
    """Each gradient within rel of the largest gradient element of the model (a parameter
    whose gradient is tiny is held to the model's scale, not its own)."""
    assert ours.keys() == ref.keys()
    scale = max(float(r.abs().max()) for r in ref.values())
    for name, r in ref.items():
        assert float((ours[name].double() - r.double()).abs().max()) <= rel * scale, name


class Calls:
    """Counts the op entry points rope_ext.diffusers' replacements use."""

    def __init__(self, monkeypatch):
        self.rope, self.fused, self.contiguous = 0, 0, []
        for owner in (functions, _fused):
            real = owner.apply_rope
            monkeypatch.setattr(owner, "apply_rope", self._count(real, "rope"))
        monkeypatch.setattr(functions, "apply_rope_qk",
                            self._count(functions.apply_rope_qk, "rope"))
        monkeypatch.setattr(rope_ext, "rms_norm_rope_qk",
                            self._count(rope_ext.rms_norm_rope_qk, "fused"))

    def _count(self, real, what):
        def counted(x, *args, **kwargs):
            setattr(self, what, getattr(self, what) + 1)
            self.contiguous.append(x.is_contiguous())
            return real(x, *args, **kwargs)
        return counted

    def reset(self):
        self.rope, self.fused, self.contiguous = 0, 0, []


# ---------------------------------------------------------------------------------------------
# a) the functions


def _interleaved(angles):
    return angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)


def _halves(angles):
    return torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("unbind", [-1, -2])
@pytest.mark.parametrize("sequence_dim", [1, 2])
def test_apply_rotary_emb_real_forms(unbind, sequence_dim, dtype):
    g = torch.Generator().manual_seed(0)
    b, h, s, d = 2, 3, 5, 8
    angles = torch.rand(s, d // 2, generator=g, dtype=torch.float64) * 6
    cos, sin = (_interleaved if unbind == -1 else _halves)(angles)
    cos, sin = cos.float(), sin.float()
    shape = (b, s, h, d) if sequence_dim == 1 else (b, h, s, d)
    # x a strided slice of a wider buffer (a q slice of a fused qkv): read in place
    x = torch.randn(*shape[:-1], 3 * d, generator=g).to(dtype)[..., d:2 * d]
    want = E.apply_rotary_emb(x, (cos, sin), use_real_unbind_dim=unbind, sequence_dim=sequence_dim)
    got = rd.apply_rotary_emb(x, (cos, sin), use_real_unbind_dim=unbind, sequence_dim=sequence_dim)
    assert got.dtype == want.dtype and got.shape == want.shape
    # float32: a few units of 2**-24 of the pair's norm; bf16: one rounding of x's dtype
    assert rel_err(got, want) <= (1e-6 if dtype == torch.float32 else 2 ** -7)
    # one table row for every token: diffusers' broadcasting, a stride-0 view here
    got1 = rd.apply_rotary_emb(x, (cos[:1], sin[:1]), use_real_unbind_dim=unbind,
                               sequence_dim=sequence_dim)
    want1 = E.apply_rotary_emb(x, (cos[:1], sin[:1]), use_real_unbind_dim=unbind,
                               sequence_dim=sequence_dim)
    assert rel_err(got1, want1) <= (1e-6 if dtype == torch.float32 else 2 ** -7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_complex_and_family_functions(dtype):
    from diffusers.models.transformers import transformer_hidream_image as hd
    from diffusers.models.transformers import transformer_ltx as ltx
    from diffusers.models.transformers import transformer_qwenimage as qw

    g = torch.Generator().manual_seed(0)
    b, s, h, d = 2, 5, 3, 8
    tol = 1e-6 if dtype == torch.float32 else 2 ** -7
    angles = torch.rand(s, d // 2, generator=g, dtype=torch.float64) * 6
    freqs = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)
    x = torch.randn(b, s, h, d, generator=g).to(dtype)
    # embeddings' complex form: [B or 1, S, D/2] (Lumina 2)
    assert rel_err(rd.apply_rotary_emb(x, freqs[None], use_real=False),
                   E.apply_rotary_emb(x, freqs[None], use_real=False)) <= tol
    # Qwen-Image's: [S, D/2], and its real form with tokens on axis 2
    assert rel_err(rd.apply_rotary_emb_qwen(x, freqs, use_real=False),
                   qw.apply_rotary_emb_qwen(x, freqs, use_real=False)) <= tol
    cos, sin = (t.float() for t in _interleaved(angles))
    xt = x.transpose(1, 2)
    assert rel_err(rd.apply_rotary_emb_qwen(xt, (cos, sin)),
                   qw.apply_rotary_emb_qwen(xt, (cos, sin))) <= tol
    # LTX: the whole projection [B, S, heads * head_dim] as one head
    wide = torch.rand(b, s, h * d // 2, generator=g, dtype=torch.float64) * 6
    lc, ls = (t.float() for t in _interleaved(wide))
    xw = x.flatten(2)
    assert rel_err(rd.ltx_apply_rotary_emb(xw, (lc, ls)), ltx.apply_rotary_emb(xw, (lc, ls))) <= tol
    # HiDream: per-pair rotation matrices from its own table builder
    ids = torch.randint(0, 20, (b, s, 2), generator=g).float()
    table = hd.HiDreamImageEmbedND(10000, [4, 4])(ids)
    k = torch.randn(b, s, 1, d, generator=g).to(dtype)
    for ours, theirs in zip(rd.hidream_apply_rope(x, k, table), hd.apply_rope(x, k, table)):
        assert ours.dtype == theirs.dtype and rel_err(ours, theirs) <= tol
    # Wan's nested function (a copy of it is the reference)
    fc, fs = (t[None, :, None] for t in _interleaved(angles))
    assert rel_err(rd.wan_apply_rotary_emb(x, fc, fs), functions._wan_eager(x, fc, fs)) <= tol


def test_signatures_are_diffusers():
    """Each replacement takes exactly its original's parameters (names, kinds, defaults)."""
    import inspect

    pairs = [(rd.apply_rotary_emb, E.apply_rotary_emb),
             (rd.apply_rotary_emb_qwen, importlib.import_module(
                 T + "transformer_qwenimage").apply_rotary_emb_qwen),
             (rd.ltx_apply_rotary_emb, importlib.import_module(T + "transformer_ltx")
              .apply_rotary_emb),
             (rd.hidream_apply_rope, importlib.import_module(T + "transformer_hidream_image")
              .apply_rope)]

    def params(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    for ours, theirs in pairs:
        assert params(ours) == params(theirs), theirs.__qualname__
    assert [p[0] for p in params(rd.wan_apply_rotary_emb)] == ["hidden_states", "freqs_cos",
                                                              "freqs_sin"]


def test_fallbacks_run_diffusers_code():
    """Inputs the op cannot take give diffusers' own result: a table that needs a gradient
    (which then gets diffusers' gradient), and shapes only diffusers' broadcasting defines."""
    g = torch.Generator().manual_seed(0)
    angles = torch.rand(5, 4, generator=g, dtype=torch.float64) * 6
    cos, sin = (t.float().requires_grad_() for t in _interleaved(angles))
    x = torch.randn(2, 3, 5, 8, generator=g, requires_grad=True)
    ours = rd.apply_rotary_emb(x, (cos, sin))
    (gx, gc) = torch.autograd.grad(ours.sum(), (x, cos))
    theirs = E.apply_rotary_emb(x, (cos, sin))
    (wx, wc) = torch.autograd.grad(theirs.sum(), (x, cos))
    assert torch.equal(ours, theirs) and torch.equal(gc, wc) and torch.equal(gx, wx)
    # a complex [S, D/2] table under embeddings' unsqueeze(2): diffusers' broadcasting error
    freqs = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)
    xs = torch.randn(2, 5, 3, 8, generator=g)
    with pytest.raises(RuntimeError) as theirs_err:
        E.apply_rotary_emb(xs, freqs, use_real=False)
    with pytest.raises(RuntimeError) as ours_err:
        rd.apply_rotary_emb(xs, freqs, use_real=False)
    assert str(ours_err.value) == str(theirs_err.value)
    # invalid arguments: diffusers' ValueError
    with pytest.raises(ValueError, match="sequence_dim"):
        rd.apply_rotary_emb(x.detach(), (cos.detach(), sin.detach()), sequence_dim=3)


def test_gradient_of_x_is_diffusers():
    g = torch.Generator().manual_seed(0)
    angles = torch.rand(5, 4, generator=g, dtype=torch.float64) * 6
    cos, sin = (t.float() for t in _halves(angles))
    x = torch.randn(2, 5, 3, 8, generator=g, requires_grad=True)
    w = torch.randn(2, 5, 3, 8, generator=g)
    (ours,) = torch.autograd.grad((rd.apply_rotary_emb(x, (cos, sin), use_real_unbind_dim=-2,
                                                       sequence_dim=1) * w).sum(), x)
    (theirs,) = torch.autograd.grad((E.apply_rotary_emb(x, (cos, sin), use_real_unbind_dim=-2,
                                                        sequence_dim=1) * w).sum(), x)
    assert rel_err(ours, theirs) <= 1e-6


# ---------------------------------------------------------------------------------------------
# b) each family, patched against unpatched

FAMS = ["flux", "chroma", "flux2", "wan", "skyreels_v2", "hunyuan_video", "cogvideox", "ltx",
        "qwenimage", "cosmos", "cogview4", "lumina2", "hidream"]
# op calls per forward of the tiny model: (rotations, fused norm + RoPE calls) with fusing
CALLS = {"flux": (0, 3), "chroma": (0, 3), "wan": (0, 2), "qwenimage": (0, 2),
         "flux2": (4, 0), "skyreels_v2": (4, 0), "hunyuan_video": (4, 0), "cogvideox": (2, 0),
         "ltx": (2, 0), "cosmos": (2, 0), "cogview4": (2, 0), "hidream": (2, 0)}


@pytest.mark.parametrize("fam", FAMS)
def test_family_forward_and_training_step(fam, monkeypatch):
    model, kw = tiny(fam)
    with torch.no_grad():
        ref_eval = output(model.eval(), kw)
    model.train()
    ref_out, ref_grads = train_step(model, kw)
    calls = Calls(monkeypatch)
    with rd.patched(fam) as result:
        assert rd.is_patched(fam)
        assert result.newly_patched and not result.skipped
        calls.reset()
        out, grads = train_step(model, kw)
        with torch.no_grad():
            eval_out = output(model.eval(), kw)
    assert rel_err(out, ref_out) <= 1e-5
    assert rel_err(eval_out, ref_eval) <= 1e-5
    assert_grads_close(grads, ref_grads)
    norm_grads = [n for n in ref_grads if "norm_q" in n or "norm_k" in n]
    for name in norm_grads:
        assert float(ref_grads[name].abs().max()) > 0, name  # the norm weights learn
    assert calls.rope + calls.fused > 0
    if fam in CALLS:
        assert (calls.rope, calls.fused) == tuple(2 * c for c in CALLS[fam])  # train + eval
    assert not rd.is_patched(fam)
    # diffusers' own arithmetic again after the context
    with torch.no_grad():
        assert torch.equal(output(model, kw), output(model, kw))


@pytest.mark.parametrize("fam", ["flux", "wan", "qwenimage", "ltx", "hunyuan_video", "cosmos"])
def test_bf16_within_its_rounding(fam):
    """bf16 patched is as close to the float32 result as diffusers' own bf16 run (both round
    from float32; rope_ext once, diffusers two or three times), and close to that run."""
    model, kw = tiny(fam)
    model.eval()
    with torch.no_grad():
        ref = output(model, kw)
        model = model.to(torch.bfloat16)
        kw16 = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point()
                and not k.endswith("_ids") else v for k, v in kw.items()}
        theirs = output(model, kw16)
        with rd.patched(fam):
            ours = output(model, kw16)
    assert ours.dtype == torch.bfloat16
    assert rel_err(ours, ref) <= 1.5 * rel_err(theirs, ref) + 2 ** -8
    assert rel_err(ours, theirs) <= 4 * 2 ** -8


@pytest.mark.parametrize("fam", ["flux", "wan"])
@pytest.mark.parametrize("fuse", [True, False])
def test_lora_adapter_grads(fam, fuse):
    """Base weights frozen, a small trainable adapter on every to_q and to_k: the adapter's
    gradients (the only ones) equal the unpatched run's."""
    model, kw = tiny(fam)
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(7)

    class Adapter(torch.nn.Module):
        def __init__(self, base, rank=2):
            super().__init__()
            self.base = base
            self.down = torch.nn.Parameter(0.2 * torch.randn(rank, base.in_features, generator=g))
            self.up = torch.nn.Parameter(0.2 * torch.randn(base.out_features, rank, generator=g))

        def forward(self, x):
            return self.base(x) + (x @ self.down.t()) @ self.up.t()

    n = 0
    for module in list(model.modules()):
        if hasattr(module, "to_q") and hasattr(module, "to_k"):
            module.to_q, module.to_k = Adapter(module.to_q), Adapter(module.to_k)
            n += 1
    assert n >= 2
    ref_out, ref_grads = train_step(model, kw)
    assert set(ref_grads) == {name for name, p in model.named_parameters() if p.requires_grad}
    with rd.patched(fam, fuse=fuse) as result:
        assert bool(result.fused) == fuse
        out, grads = train_step(model, kw)
    assert rel_err(out, ref_out) <= 1e-5
    assert_grads_close(grads, ref_grads)


def test_slices_read_in_place(monkeypatch):
    """q and k views are handed to the op as they are (no .contiguous()): Flux with fused qkv
    projections (q and k column slices of one matmul's output, into the fused norm + RoPE),
    HunyuanVideo's single-stream blocks (the image tokens of the joint sequence)."""
    calls = Calls(monkeypatch)
    for fam in ("flux", "hunyuan_video"):
        model, kw = tiny(fam)
        if fam == "flux":
            model.fuse_qkv_projections()
        with torch.no_grad():
            ref = output(model, kw)
        calls.reset()
        with rd.patched(fam), torch.no_grad():
            out = output(model, kw)
        assert rel_err(out, ref) <= 1e-5
        assert calls.contiguous and not all(calls.contiguous), fam


# ---------------------------------------------------------------------------------------------
# e) unknown code is refused and reported


def _other_ltx_rotation(x, freqs):
    cos, sin = freqs
    x_real, x_imag = x.unflatten(2, (-1, 2)).unbind(-1)
    x_rotated = torch.stack([x_imag, -x_real], dim=-1).flatten(2)  # the other direction
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def test_changed_function_is_refused_and_reported(monkeypatch):
    ltx = importlib.import_module(T + "transformer_ltx")
    monkeypatch.setattr(ltx, "apply_rotary_emb", _other_ltx_rotation)
    name = T + "transformer_ltx.apply_rotary_emb"
    with pytest.raises(RuntimeError, match="not the verified form"):
        rd.patch(["flux", "ltx"])
    assert ltx.apply_rotary_emb is _other_ltx_rotation
    assert not rd.is_patched("flux")  # nothing of that call stays patched
    assert "not the verified form" in rd.report().left_alone[name]
    assert name not in rd.report().patched


def _changed_wan_call(self, attn, hidden_states, encoder_hidden_states=None,
                      attention_mask=None, rotary_emb=None):
    def apply_rotary_emb(hidden_states, freqs_cos, freqs_sin):
        x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
        out = torch.empty_like(hidden_states)
        out[..., 0::2] = x1 * freqs_cos[..., 0::2] + x2 * freqs_sin[..., 1::2]
        out[..., 1::2] = x2 * freqs_cos[..., 0::2] - x1 * freqs_sin[..., 1::2]
        return out.type_as(hidden_states)

    return apply_rotary_emb(hidden_states, *rotary_emb)


def _wrapped_flux_call(original):
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        return original(self, attn, hidden_states, encoder_hidden_states, attention_mask,
                        image_rotary_emb)
    return __call__


def test_changed_processors_are_refused(monkeypatch):
    wan = importlib.import_module(T + "transformer_wan")
    flux = importlib.import_module(T + "transformer_flux")
    monkeypatch.setattr(wan.WanAttnProcessor, "__call__", _changed_wan_call)
    with pytest.raises(RuntimeError, match="nested apply_rotary_emb is not the verified form"):
        rd.patch("wan")
    assert wan.WanAttnProcessor.__call__ is _changed_wan_call
    # A processor wrapped by someone: its RoPE still routes (the module's binding), the
    # fused forward is refused (not fused, reported), and patch(fuse=False) is fine.
    wrapped = _wrapped_flux_call(flux.FluxAttnProcessor.__call__)
    monkeypatch.setattr(flux.FluxAttnProcessor, "__call__", wrapped)
    with pytest.raises(RuntimeError, match="FluxAttnProcessor.__call__ is not the verified"):
        rd.patch("flux")
    result = rd.patch("flux", fuse=False)
    assert T + "transformer_flux.apply_rotary_emb" in result and not result.fused
    assert flux.FluxAttnProcessor.__call__ is wrapped
    key = T + "transformer_flux.FluxAttnProcessor"
    assert "not the verified form" in rd.report().left_alone[key]


def test_changed_shared_function_refuses_its_callers(monkeypatch):
    def other(x, freqs_cis, use_real=True, use_real_unbind_dim=-1, sequence_dim=2):
        return x

    monkeypatch.setattr(E, "apply_rotary_emb", other)
    with pytest.raises(RuntimeError, match="embeddings.apply_rotary_emb is not the verified"):
        rd.patch("cosmos")
    assert E.apply_rotary_emb is other


# ---------------------------------------------------------------------------------------------
# f) everything at once


def test_patch_everything_report_and_unpatch():
    """patch() imports and checks every family: all are patched (nothing refused in this
    diffusers), the fused processors are listed, the unsupported code is reported with its
    reason; unpatch() puts back the very same objects."""
    before = {}
    for fam, targets in rd._FAMILY_TARGETS.items():
        for t in targets:
            if t.kind == "local":
                continue  # nothing of the module is replaced: embeddings' function is
            mod = importlib.import_module(t.module)
            obj = getattr(mod, t.attr)
            before[(t.module, t.attr)] = obj.__dict__["__call__"] if isinstance(obj, type) else obj
    before_emb = E.apply_rotary_emb
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing refused: no warning
        result = rd.patch()
    assert not result.skipped
    for fam in rd.FAMILIES:
        assert rd.is_patched(fam), fam
    rep = rd.report()
    assert E.apply_rotary_emb is rd.apply_rotary_emb
    assert T + "transformer_flux.apply_rotary_emb" in rep.patched
    assert T + "transformer_cosmos" in rep.patched  # its processor imports at call time
    assert T + "transformer_wan.WanAttnProcessor.__call__" in rep.patched
    assert set(rep.fused) == {T + "transformer_flux.FluxAttnProcessor",
                              T + "transformer_wan.WanAttnProcessor",
                              T + "transformer_chronoedit.WanAttnProcessor",
                              T + "transformer_wan_animate.WanAttnProcessor",
                              T + "transformer_qwenimage.QwenDoubleStreamAttnProcessor2_0"}
    assert "not verified" in rep.left_alone[T + "transformer_ltx2"]
    assert "Mochi" in rep.left_alone["diffusers.models.attention_processor.MochiAttnProcessor2_0"]
    # a second patch changes nothing
    assert not rd.patch().newly_patched
    restored = rd.unpatch()
    assert T + "transformer_flux.FluxAttnProcessor" in restored
    assert E.apply_rotary_emb is before_emb
    for (module, attr), obj in before.items():
        now = getattr(importlib.import_module(module), attr)
        assert (now.__dict__["__call__"] if isinstance(now, type) else now) is obj, (module, attr)
    assert not rd.report().patched and not rd.report().fused


def test_unknown_family_names():
    with pytest.raises(ValueError, match="not a family"):
        rd.patch("llama")
    with pytest.raises(ValueError, match="not supported"):
        rd.patch("ltx2")
    with pytest.raises(TypeError):
        rd.patch(3)
