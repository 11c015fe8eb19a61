"""rope_ext.torchtitan against torchtitan's own RoPE modules and a float64 reference.

- The tables: rope_ext's caches against float64 angles from torchtitan's formulas (written
  out below in float64, not taken from rope_ext), torchtitan's own caches within the bound
  of their float32 angles.
- The rotation: both modules' outputs and gradients against the float64 reference, and
  against each other at short positions.
- Whole models: torchtitan's debug Llama 3, Qwen3 and DeepSeek-V3 model definitions, built on
  the CPU with a tiny vocabulary, trained a few steps with torchtitan's RoPE and with
  rope_ext's (through torchtitan's override machinery): the same losses and gradients.
- The ways in (overrides, convert, swap_modules, patch) and the source check that guards them.

torchtitan imports triton at module level only for its expert-parallel GPU kernels
(``torchtitan.distributed.minimal_async_ep.kernels``); where triton is not installed (a
CPU-only torch), that one module is replaced by a stub whose functions raise, so that the
model definitions, which never call those kernels on the CPU, can be imported. torch itself
never sees a triton module.
"""

import copy
import dataclasses
import importlib.util
import math
import sys
import types

import pytest
import torch

import reference as ref

_KERNELS = "torchtitan.distributed.minimal_async_ep.kernels"
_KERNEL_NAMES = ("copy_full_counts_to_peers_kernel", "copy_rows_to_peers_kernel",
                 "expand_topk_grad_kernel", "fill_combine_metadata_kernel",
                 "fill_dispatch_metadata_kernel", "invert_flat_indices_kernel",
                 "reduce_topk_slots_kernel", "topk_scores_grad_kernel")


def _stub_triton_kernels():
    """Stand in for torchtitan's triton-only expert-parallel kernels (see the module doc)."""
    if importlib.util.find_spec("triton") is not None or _KERNELS in sys.modules:
        return
    stub = types.ModuleType(_KERNELS)
    stub.__doc__ = "Stand-in for torchtitan's triton kernels (triton is not installed)."
    for name in _KERNEL_NAMES:
        def missing(*args, _name=name, **kwargs):
            raise RuntimeError(f"{_KERNELS}.{_name} needs triton, which is not installed")
        setattr(stub, name, missing)
    sys.modules[_KERNELS] = stub


if importlib.util.find_spec("torchtitan") is None:
    pytest.skip("torchtitan is not installed", allow_module_level=True)
_stub_triton_kernels()

tt_rope = pytest.importorskip("torchtitan.models.common.rope")
import rope_ext.torchtitan as rt  # noqa: E402
from torchtitan.models.common.attention import (  # noqa: E402
    FlexAttention, ScaledDotProductAttention)

F32_ULP = 2.0 ** -24


# ---------------------------------------------------------------------------------------------
# float64 reference: torchtitan's frequency formulas, in double precision


def ref_inv_freq(cfg):
    """The inverse frequencies torchtitan's config means, computed in float64 from its formulas
    (torchtitan.models.common.rope: _precompute_cache's "llama" branch and _yarn_inv_freq)."""
    d, base = cfg.dim, float(cfg.theta)
    freqs = [base ** (-(2 * i) / d) for i in range(d // 2)]
    if cfg.scaling == "llama":
        orig, low, high = (cfg.original_max_position_embeddings, cfg.low_freq_factor,
                           cfg.high_freq_factor)
        out = []
        for f in freqs:
            wavelen = 2 * math.pi / f
            if wavelen < orig / high:
                out.append(f)
            elif wavelen > orig / low:
                out.append(f / cfg.scaling_factor)
            else:
                smooth = (orig / wavelen - low) / (high - low)
                out.append((1 - smooth) * f / cfg.scaling_factor + smooth * f)
        freqs = out
    elif cfg.scaling == "yarn" and cfg.rope_factor > 1.0:
        def correction_dim(rotations):
            return d * math.log(cfg.original_seq_len / (rotations * 2 * math.pi)) / (
                2 * math.log(base))
        lo, hi = correction_dim(cfg.beta_fast), correction_dim(cfg.beta_slow)
        if cfg.truncate:
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, d - 1)
        if lo == hi:
            hi += 0.001
        ramp = [min(max((i - lo) / (hi - lo), 0.0), 1.0) for i in range(d // 2)]
        freqs = [f / cfg.rope_factor * w + f * (1 - w) for f, w in zip(freqs, ramp)]
    return torch.tensor(freqs, dtype=torch.float64)


def ref_table(cfg, rows=None):
    """float64 cos/sin [rows, dim/2] of torchtitan's angles."""
    return ref.table(ref_inv_freq(cfg), cfg.max_seq_len if rows is None else rows)


def cache_cos_sin(module):
    """(cos, sin) [P, dim/2] out of a torchtitan-format cache (either module's)."""
    cache = module.cache
    if cache.is_complex():
        return cache.real, cache.imag
    half = cache.shape[-1] // 4
    # CosSinRoPE keeps each value twice: both copies must hold it.
    assert torch.equal(cache[:, :half], cache[:, half:2 * half])
    assert torch.equal(cache[:, 2 * half:3 * half], cache[:, 3 * half:])
    return cache[:, :half], cache[:, 2 * half:3 * half]


def float32_angle_bound(cfg, rows):
    """How far torchtitan's float32 table may be from the float64 one, per [row, pair].

    Its angle is fl(m * fl(theta_i)): theta_i is a few float32 operations (pow, division; the
    Llama and YaRN blends a few more), each off by half an ulp, and the product rounds once
    more, so the angle is off by up to ~8 ulps of m * theta_i; cos and sin of it add one ulp.
    """
    m = torch.arange(rows, dtype=torch.float64)[:, None]
    return 8 * F32_ULP * m * ref_inv_freq(cfg)[None, :] + 2 * F32_ULP


# The configs torchtitan's model families use (debug and full sizes share their RoPE).
CONFIGS = {
    "llama3 (llama scaling)": (tt_rope.ComplexRoPE, dict(dim=128, max_seq_len=8192,
                                                         theta=500000, scaling="llama")),
    "llama3 debug (dim 16)": (tt_rope.ComplexRoPE, dict(dim=16, max_seq_len=131072,
                                                        theta=500000, scaling="llama")),
    "deepseek_v3 (yarn)": (tt_rope.ComplexRoPE, dict(
        dim=64, max_seq_len=16384, theta=10000.0, scaling="yarn", rope_factor=40.0,
        beta_fast=32.0, beta_slow=1.0, original_seq_len=4096)),
    "qwen3": (tt_rope.CosSinRoPE, dict(dim=128, max_seq_len=4096, theta=1000000.0)),
    "gpt_oss (yarn, untruncated)": (tt_rope.CosSinRoPE, dict(
        dim=64, max_seq_len=8192, theta=150000.0, scaling="yarn", rope_factor=32.0,
        beta_fast=32.0, beta_slow=1.0, original_seq_len=4096, truncate=False)),
}


def build_pair(name):
    """torchtitan's module and rope_ext's, from the same config."""
    stock_cls, kwargs = CONFIGS[name]
    ours_cls = rt.ComplexRoPE if stock_cls is tt_rope.ComplexRoPE else rt.CosSinRoPE
    return stock_cls.Config(**kwargs).build(), ours_cls.Config(**kwargs).build()


# ---------------------------------------------------------------------------------------------
# The source check


def test_installed_torchtitan_is_the_verified_form():
    assert rt.verify() == {}


def test_changed_torchtitan_code_is_refused(monkeypatch):
    import ast

    real_tree = rt.module_tree(tt_rope)

    def tree_with_interleaved_rotate_half(module):
        tree = copy.deepcopy(real_tree)
        cos_sin = next(n for n in tree.body if isinstance(n, ast.ClassDef)
                       and n.name == "CosSinRoPE")
        fn = next(n for n in cos_sin.body if isinstance(n, ast.FunctionDef)
                  and n.name == "_rotate_half")
        fn.body = ast.parse("x1 = x[..., 0::2]\nx2 = x[..., 1::2]\n"
                            "return torch.stack((-x2, x1), dim=-1).flatten(-2)").body
        return tree

    monkeypatch.setattr(rt, "module_tree", tree_with_interleaved_rotate_half)
    monkeypatch.setattr(rt, "_verified", None)
    assert rt.verify() == {"CosSinRoPE._rotate_half": "its code differs"}
    cfg = tt_rope.CosSinRoPE.Config(dim=8, max_seq_len=16)
    with pytest.raises(RuntimeError, match="CosSinRoPE._rotate_half"):
        rt.patch()
    with pytest.raises(RuntimeError, match="differs"):
        rt.cos_sin_rope(cfg)
    assert rt._patched == {}
    monkeypatch.setattr(rt, "_verified", None)  # the real answer for the other tests


# ---------------------------------------------------------------------------------------------
# Tables and the rotation against float64


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tables_against_float64(name):
    stock, ours = build_pair(name)
    assert ours.cache.shape == stock.cache.shape and ours.cache.dtype == stock.cache.dtype
    rows = stock.cache.shape[0]
    want_cos, want_sin = ref_table(stock.config, rows)
    ours_err = torch.stack([(c.double() - w).abs() for c, w in
                            zip(cache_cos_sin(ours), (want_cos, want_sin))]).amax(0)
    stock_err = torch.stack([(c.double() - w).abs() for c, w in
                             zip(cache_cos_sin(stock), (want_cos, want_sin))]).amax(0)
    # ours: each entry rounded once from float64 (half an ulp of a value <= 1)
    assert ours_err.max().item() <= F32_ULP / 2
    # torchtitan's: within the float32 angle's bound, and further off than ours at the end
    assert bool((stock_err <= float32_angle_bound(stock.config, rows)).all())
    assert ours_err[-64:].max() < stock_err[-64:].max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["llama3 (llama scaling)", "deepseek_v3 (yarn)", "qwen3"])
def test_rotation_and_gradient_against_float64(name, dtype):
    stock, ours = build_pair(name)
    cfg = stock.config
    d, rows = cfg.dim, cfg.max_seq_len
    interleaved = isinstance(stock, tt_rope.ComplexRoPE)
    g = torch.Generator().manual_seed(1)
    # q and k sliced out of one projection (strided, as DeepSeek-V3's q_pe / k_pe are)
    qk = torch.randn(2, 24, 6, d + 4, generator=g, dtype=torch.float64)
    q = qk[:, :, :4, 4:].to(dtype).requires_grad_()
    k = qk[:, :, 4:, 4:].to(dtype).requires_grad_()
    positions = torch.randint(0, rows, (2, 24), generator=g)
    positions[:, -1] = rows - 1
    cos64, sin64 = ref_table(cfg, rows)
    for module, tol in ((ours, ref.PAIR_TOL[dtype] + F32_ULP),
                        (stock, ref.PAIR_TOL[dtype] + 8 * F32_ULP * rows * 1.0)):
        q_out, k_out = module(q, k, positions)
        assert q_out.dtype == dtype and k_out.dtype == dtype
        for x, out in ((q, q_out), (k, k_out)):
            want = ref.rope(x.detach(), cos64, sin64, positions, interleaved)
            ref.assert_pairs_close(out.detach(), want, x.detach(), d, interleaved, tol=tol)
        grad_q = torch.randn(q_out.shape, generator=g).to(dtype)
        grad_k = torch.randn(k_out.shape, generator=g).to(dtype)
        dq, dk = torch.autograd.grad((q_out, k_out), (q, k), (grad_q, grad_k))
        # the gradient of a rotation is the inverse rotation of the output gradient
        for grad_out, grad_in in ((grad_q, dq), (grad_k, dk)):
            want = ref.rope(grad_out, cos64, sin64, positions, interleaved, inverse=True)
            ref.assert_pairs_close(grad_in, want, grad_out, d, interleaved, tol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("positions", ["none", "1s", "bs"])
@pytest.mark.parametrize("name", ["llama3 debug (dim 16)", "deepseek_v3 (yarn)", "qwen3"])
def test_same_as_torchtitan(name, positions, dtype):
    """At short positions (where torchtitan's float32 angles are still close) both give the
    same result: within a few float32 ulps, or one rounding of bf16."""
    stock, ours = build_pair(name)
    d = stock.config.dim
    g = torch.Generator().manual_seed(2)
    q = torch.randn(3, 40, 4, d, generator=g).to(dtype)
    k = torch.randn(3, 40, 2, d, generator=g).to(dtype)
    pos = {"none": None, "1s": torch.arange(7, 47)[None],
           "bs": torch.cat([torch.arange(25), torch.arange(15)]).expand(3, -1)}[positions]
    interleaved = isinstance(stock, tt_rope.ComplexRoPE)
    # each side's own error (one rounding to dtype; ours exact angles, torchtitan's float32
    # angles off by up to ~8 ulps of m * theta_i <= 8 ulps of m, theta_0 being 1)
    max_pos = 46 if pos is not None else 39
    tol = 2 * ref.PAIR_TOL[dtype] + 8 * F32_ULP * max_pos
    for got, want, x in zip(ours(q, k, pos), stock(q, k, pos), (q, k)):
        ref.assert_pairs_close(got, want.double(), x, d, interleaved, tol=tol)


def test_strided_and_sharded_forms_of_positions():
    """positions [1, seq] broadcast over the batch exactly as [batch, seq] does."""
    _, ours = build_pair("qwen3")
    q, k = torch.randn(2, 10, 4, 128), torch.randn(2, 10, 2, 128)
    pos = torch.arange(100, 110)
    a = ours(q, k, pos[None])
    b = ours(q, k, pos.expand(2, -1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_bad_inputs():
    stock, ours = build_pair("qwen3")
    q, k = torch.randn(1, 4, 2, 64), torch.randn(1, 4, 2, 64)
    with pytest.raises(ValueError, match="head_dim"):
        ours(q, k)
    q, k = torch.randn(1, 4, 2, 128), torch.randn(1, 4, 2, 128)
    with pytest.raises(RuntimeError, match="position_ids exceed"):  # torchtitan's own check
        ours(q, k, torch.tensor([[0, 1, 2, 4096]]))
    with pytest.raises(NotImplementedError, match="Llama scaling"):  # as torchtitan's
        rt.CosSinRoPE.Config(dim=8, max_seq_len=8, scaling="llama").build()


def test_dtype_cast_keeps_the_table_exact():
    _, ours = build_pair("qwen3")
    before = ours.cache.clone()
    ours.to(torch.bfloat16)
    assert ours.cache.dtype == torch.float32 and torch.equal(ours.cache, before)


def test_meta_build_then_init_states():
    """torchtitan builds on the meta device, then to_empty() and init_states(buffer_device)."""
    cfg = rt.ComplexRoPE.Config(**CONFIGS["deepseek_v3 (yarn)"][1])
    with torch.device("meta"):
        module = cfg.build()
    assert module.cache.is_meta and module.cache.dtype == torch.complex64
    module.to_empty(device="cpu")
    module.init_states(buffer_device=torch.device("cpu"))
    assert torch.equal(module.cache, cfg.build().cache)


# ---------------------------------------------------------------------------------------------
# Whole models: torchtitan's debug model definitions, trained with and without rope_ext

VOCAB = 64


def debug_config(family):
    """torchtitan's debug model config of a family (its layer arguments and RoPE), with two
    layers, a tiny vocabulary and SDPA as the inner attention (its default, FlexAttention,
    has no backward on the CPU)."""
    if family == "llama3":
        from torchtitan.models.llama3 import llama3_configs
        cfg = llama3_configs["debugmodel"](attn_backend="flex")
    elif family == "qwen3":
        from torchtitan.models.qwen3 import qwen3_configs
        cfg = qwen3_configs["debugmodel"](attn_backend="flex")
    else:
        from torchtitan.models.deepseek_v3 import deepseekv3_configs
        cfg = deepseekv3_configs["debugmodel"](attn_backend="flex", moe_comm_backend="standard")
    for _, _, parent, attr in list(cfg.traverse(FlexAttention.Config)):
        if isinstance(parent, list):
            parent[attr] = ScaledDotProductAttention.Config()
        else:
            setattr(parent, attr, ScaledDotProductAttention.Config())
    # Two layers keep the test short on a small CPU and keep every kind of layer: DeepSeek-V3's
    # first layer is dense, its second a mixture of experts.
    cfg.layers = cfg.layers[:2]
    cfg.vocab_size = VOCAB
    cfg.tok_embeddings.num_embeddings = VOCAB
    cfg.lm_head.out_features = VOCAB
    return cfg


def rope_modules(model):
    return [m for m in model.modules() if isinstance(m, tt_rope.RoPE)]


def train_steps(model, tokens, positions, steps=3):
    """Losses and gradients of a few SGD steps."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses, grads = [], []
    for _ in range(steps):
        opt.zero_grad()
        logits = model(tokens[:, :-1], positions[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None})
        opt.step()
    return losses, grads


# torchtitan's MoE router asks for float32 autocast, which the CPU does not have (a warning)
@pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")
@pytest.mark.parametrize("family", ["llama3", "qwen3", "deepseek_v3"])
def test_training_matches_torchtitan(family):
    torch.manual_seed(0)
    stock = debug_config(family).build()
    stock.init_states()
    cfg = debug_config(family)
    lines = rt.convert(cfg)
    assert len(lines) == len(cfg.layers)
    ours = cfg.build()
    ours.load_state_dict(stock.state_dict())
    assert all(type(m) in (tt_rope.ComplexRoPE, tt_rope.CosSinRoPE) for m in rope_modules(stock))
    assert rope_modules(ours) and all(type(m) in (rt.ComplexRoPE, rt.CosSinRoPE)
                                      for m in rope_modules(ours))

    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (2, 33), generator=g)
    # two packed documents per row: positions restart at each document
    positions = torch.cat([torch.arange(21), torch.arange(12)]).expand(2, -1)
    stock_losses, stock_grads = train_steps(stock, tokens, positions)
    our_losses, our_grads = train_steps(ours, tokens, positions)
    for step, (a, b) in enumerate(zip(our_losses, stock_losses)):
        assert abs(a.item() - b.item()) <= 1e-5 * abs(b.item()), (step, a, b)
    for step, (ga, gb) in enumerate(zip(our_grads, stock_grads)):
        assert ga.keys() == gb.keys()
        # relative to the whole gradient's norm: a parameter whose gradient is tiny (a norm's
        # weight in an expert layer) is measured against the gradient it is part of
        scale = torch.stack([g.norm() for g in gb.values()]).norm().item()
        for name in gb:
            diff = (ga[name] - gb[name]).norm().item()
            assert diff <= 1e-5 * scale, (step, name, diff, scale)


def test_swap_modules_and_patch_build_the_same_model():
    torch.manual_seed(0)
    stock = debug_config("llama3").build()
    stock.init_states()
    swapped = copy.deepcopy(stock)
    names = rt.swap_modules(swapped)
    assert names == [f"layers.{i}.attention.rope" for i in range(len(stock.layers))]
    assert swapped.state_dict().keys() == stock.state_dict().keys()
    with rt.patched() as patched_names:
        assert len(patched_names) == 2
        patched = debug_config("llama3").build()  # a stock config, built while patched
    assert all(type(m) is rt.ComplexRoPE for m in rope_modules(patched))
    assert all(type(m) is tt_rope.ComplexRoPE for m in rope_modules(debug_config("llama3")
                                                                     .build()))
    patched.load_state_dict(stock.state_dict())
    tokens = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        a, b, c = swapped(tokens), patched(tokens), stock(tokens)
    assert torch.equal(a, b)
    assert (a - c).norm() <= 1e-5 * c.norm()


def test_override_factories_keep_every_field():
    cfg = tt_rope.ComplexRoPE.Config(**CONFIGS["deepseek_v3 (yarn)"][1])
    new = rt.complex_rope(cfg)
    assert type(new) is rt.ComplexRoPE.Config
    assert {f.name: getattr(new, f.name) for f in dataclasses.fields(cfg)} == \
        {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
