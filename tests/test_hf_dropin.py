"""rope_ext.hf: the drop-in apply_rotary_pos_emb and patch(), checked against transformers itself.

* The function against transformers' Llama (and GPT-NeoX, for partial rotary) function on
  cos/sin made by transformers' own rotary embedding modules, with docs/math.md section 13's
  per-pair tolerances: the error of each rotated pair (a, b) is measured as a 2-norm and bounded
  by a multiple of the input pair's norm rho (cancellation makes elementwise relative error
  meaningless). transformers' eager code rounds cos*x, rotate_half(x)*sin and their sum to x's
  dtype, about (2 sqrt 2 + 1) u rho; ours rounds once from float32. Allowed: 8u (float32,
  u = 2^-24), 4u (bf16, u = 2^-8; fp16, u = 2^-11), times the attention factor A folded into
  the table (it scales the rotated pair, and every rounding error with it).
* patch() on tiny random models of every supported family (built from a config, no download):
  logits and gradients equal transformers' own, our function really ran (counted), eager and
  under torch.compile; unpatch() restores the exact function objects and bit-identical logits.
"""

import os
import sys
import warnings

import pytest
import torch

import transformers  # only the tests use it: rope_ext never imports it at import time
from transformers import LlamaConfig
from transformers.models.gpt_neox import modeling_gpt_neox
from transformers.models.llama import modeling_llama

import rope_ext
import rope_ext.hf as hf
import tiny_models
from tiny_models import assert_grads_close, grads_of, inputs, rel_err

transformers.logging.set_verbosity_error()

HF_LLAMA_APPLY = modeling_llama.apply_rotary_pos_emb  # transformers' own, captured before any patch
HF_NEOX_APPLY = modeling_gpt_neox.apply_rotary_pos_emb
TRUE_ORIGINALS = {}  # module name -> transformers' function, read before any test patches


def _module(fam):
    import importlib

    return importlib.import_module(f"transformers.models.{fam}.modeling_{fam}")


# Families whose apply_rotary_pos_emb has the Llama meaning (full or partial rotary), each
# exercised on a tiny random model below; tests/test_hf_families.py covers every patched type.
FAMILIES = ["llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
            "gemma2", "gemma3", "granite", "granitemoe", "starcoder2", "olmoe", "smollm3",
            "falcon", "phi", "stablelm", "persimmon", "phi3", "gpt_neox", "nemotron"]
for _fam in FAMILIES:
    _mod = _module(_fam)
    TRUE_ORIGINALS[_mod.__name__] = _mod.apply_rotary_pos_emb

U = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
MULT = {torch.float32: 8, torch.bfloat16: 4, torch.float16: 4}


@pytest.fixture(autouse=True)
def _clean_patch_state():
    hf.unpatch()
    yield
    hf.unpatch()
    for name, fn in TRUE_ORIGINALS.items():  # no test may leave anything behind
        assert sys.modules[name].apply_rotary_pos_emb is fn, name


@pytest.fixture
def count_calls(monkeypatch):
    """Counts the op calls made by rope_ext.hf.apply_rotary_pos_emb (rope_ext.hf.forms looks up
    apply_rope_qk in its module at call time)."""
    calls = []
    real = hf.forms.apply_rope_qk

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(hf.forms, "apply_rope_qk", counting)
    return calls


# ---------------------------------------------------------------------------------------------
# helpers


def hf_tables(head_dim, positions, dtype, rope_parameters=None, max_pos=8192):
    """cos, sin [batch, seq, head_dim] and A from transformers' LlamaRotaryEmbedding."""
    params = {"rope_type": "default", "rope_theta": 10000.0}
    if rope_parameters:
        params.update(rope_parameters)
    cfg = LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim,
                      max_position_embeddings=max_pos, rope_parameters=params)
    emb = modeling_llama.LlamaRotaryEmbedding(cfg)
    cos, sin = emb(torch.empty(0, dtype=dtype), positions)
    return cos, sin, float(emb.attention_scaling)


def distinct_positions(batch, seq, top=4000):
    """[batch, seq] int64: every row different (an offset and random scattered positions)."""
    pos = torch.randint(0, top, (batch, seq))
    pos[0] = torch.arange(seq)  # one plain row from 0
    if batch > 1:
        pos[1] = torch.arange(seq) + 1000
    return pos


def pair_error_ratio(out, ref, x, r, dtype, scale=1.0):
    """max over pairs of |out - ref|_pair / (MULT u scale rho); also checks the tail is x's."""
    h = r // 2
    e = out.double() - ref.double()
    err = (e[..., :h] ** 2 + e[..., h:r] ** 2).sqrt()
    xd = x.double()
    rho = (xd[..., :h] ** 2 + xd[..., h:r] ** 2).sqrt()
    tol = MULT[dtype] * U[dtype] * scale * rho
    assert torch.equal(out[..., r:], ref[..., r:]), "pass-through tail differs"
    assert (err <= tol).all(), f"pair error {float((err / tol.clamp_min(1e-300)).max()):.3g}x tolerance"
    return float((err / tol.clamp_min(1e-300)).max())


def assert_rotated(ref, x, r):
    """The reference really moved the vectors (positions are not all 0): guards against a test
    that would pass with the identity."""
    assert (ref[..., :r].double() - x[..., :r].double()).abs().max() > 0.1


def rand(shape, dtype):
    return torch.randn(shape, dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------------------------------------
# the function against transformers' function


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
@pytest.mark.parametrize("scaling", [None, "yarn"])
def test_matches_transformers_llama_function(dtype, unsqueeze_dim, scaling):
    batch, seq, hq, hk, d = 3, 11, 4, 2, 64
    rp = None if scaling is None else {"rope_type": "yarn", "factor": 4.0,
                                       "original_max_position_embeddings": 2048}
    pos = distinct_positions(batch, seq)
    cos, sin, attn = hf_tables(d, pos, dtype, rp)
    if scaling == "yarn":
        assert attn == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1)  # A in the table
    # q, k as transformers' attention holds them: slices of one projection, heads made a view.
    proj = rand((batch, seq, (hq + 2 * hk) * d), dtype)
    q = proj[..., :hq * d].unflatten(-1, (hq, d))
    k = proj[..., hq * d:(hq + hk) * d].unflatten(-1, (hk, d))
    if unsqueeze_dim == 1:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    ref_q, ref_k = HF_LLAMA_APPLY(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    out_q, out_k = hf.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    for out, ref, x in ((out_q, ref_q, q), (out_k, ref_k, k)):
        assert out.shape == ref.shape and out.dtype == ref.dtype == dtype
        assert_rotated(ref, x, d)
        pair_error_ratio(out, ref, x, d, dtype, scale=max(attn, 1.0))


def test_position_ids_ignored_and_positional_unsqueeze_dim():
    batch, seq, h, d = 2, 5, 3, 16
    pos = distinct_positions(batch, seq)
    cos, sin, _ = hf_tables(d, pos, torch.float32)
    q, k = rand((batch, seq, h, d), torch.float32), rand((batch, seq, h, d), torch.float32)
    ref = HF_LLAMA_APPLY(q, k, cos, sin, unsqueeze_dim=2)
    # The old signature's deprecated position_ids: any tensor, ignored.
    a = hf.apply_rotary_pos_emb(q, k, cos, sin, pos * 7 + 3, unsqueeze_dim=2)
    # transformers 5.x's signature (q, k, cos, sin, unsqueeze_dim): the 5th positional int.
    b = hf.apply_rotary_pos_emb(q, k, cos, sin, 2)
    for out in (a, b):
        for o, r, x in zip(out, ref, (q, k)):
            pair_error_ratio(o, r, x, d, torch.float32)
    with pytest.raises(TypeError, match="position_ids"):
        hf.apply_rotary_pos_emb(q, k, cos, sin, [0, 1, 2])


@pytest.mark.parametrize("unsqueeze_dim", [-3, -2])
def test_negative_unsqueeze_dim_as_transformers(unsqueeze_dim):
    pos = distinct_positions(2, 6)
    cos, sin, _ = hf_tables(32, pos, torch.float32)
    shape = (2, 4, 6, 32) if unsqueeze_dim == -3 else (2, 6, 4, 32)
    q, k = rand(shape, torch.float32), rand(shape, torch.float32)
    ref = HF_LLAMA_APPLY(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    out = hf.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    for o, r, x in zip(out, ref, (q, k)):
        pair_error_ratio(o, r, x, 32, torch.float32)


@pytest.mark.parametrize("form", ["batch1", "seq1"])
def test_broadcast_tables_like_transformers(form):
    """cos [1, seq, r] shared by the batch, and cos [batch, 1, r] (one position per row, e.g.
    a decode step written for all tokens), broadcast as transformers' arithmetic does."""
    batch, seq, h, d = 3, 7, 2, 32
    pos = distinct_positions(batch, seq)
    cos, sin, _ = hf_tables(d, pos, torch.float32)
    cos, sin = (cos[:1], sin[:1]) if form == "batch1" else (cos[:, 3:4], sin[:, 3:4])
    q, k = rand((batch, h, seq, d), torch.float32), rand((batch, 1, seq, d), torch.float32)
    ref = HF_LLAMA_APPLY(q, k, cos, sin)
    out = hf.apply_rotary_pos_emb(q, k, cos, sin)
    for o, r, x in zip(out, ref, (q, k)):
        assert o.shape == r.shape
        assert_rotated(r, x, d)
        pair_error_ratio(o, r, x, d, torch.float32)


def test_partial_rotary_matches_transformers_gpt_neox_function():
    """r < head_dim: the tail passes through, as in transformers' GPT-NeoX function (the Llama
    one cannot broadcast it). Tables from GPTNeoXRotaryEmbedding with rotary_pct 0.25."""
    cfg = transformers.GPTNeoXConfig(hidden_size=128, num_attention_heads=2, rotary_pct=0.25,
                                     max_position_embeddings=4096)
    emb = modeling_gpt_neox.GPTNeoXRotaryEmbedding(cfg)
    batch, seq, d = 2, 9, 64
    pos = distinct_positions(batch, seq)
    for dtype in (torch.float32, torch.bfloat16):
        cos, sin = emb(torch.empty(0, dtype=dtype), pos)
        assert cos.shape[-1] == 16
        qkv = rand((batch, 2, seq, 3 * d), dtype)  # GPT-NeoX: chunks of one fused projection
        q, k, _ = qkv.chunk(3, dim=-1)
        ref = HF_NEOX_APPLY(q, k, cos, sin)
        out = hf.apply_rotary_pos_emb(q, k, cos, sin)
        for o, r, x in zip(out, ref, (q, k)):
            assert_rotated(r, x, 16)
            pair_error_ratio(o, r, x, 16, dtype)  # also: tail bit-identical


def test_dtype_promotion_like_transformers():
    """bf16 q/k with float32 tables: transformers' arithmetic gives float32, so does ours."""
    pos = distinct_positions(2, 5)
    cos, sin, _ = hf_tables(32, pos, torch.float32)
    q, k = rand((2, 2, 5, 32), torch.bfloat16), rand((2, 2, 5, 32), torch.bfloat16)
    ref = HF_LLAMA_APPLY(q, k, cos, sin)
    out = hf.apply_rotary_pos_emb(q, k, cos, sin)
    for o, r, x in zip(out, ref, (q, k)):
        assert o.dtype == r.dtype == torch.float32
        pair_error_ratio(o, r, x, 32, torch.float32)
    # float32 q/k with bf16 tables: float32 out; the bf16 table is widened exactly.
    cos16, sin16 = cos.bfloat16(), sin.bfloat16()
    q32, k32 = q.float(), k.float()
    ref = HF_LLAMA_APPLY(q32, k32, cos16, sin16)
    out = hf.apply_rotary_pos_emb(q32, k32, cos16, sin16)
    for o, r, x in zip(out, ref, (q32, k32)):
        assert o.dtype == r.dtype == torch.float32
        pair_error_ratio(o, r, x, 32, torch.float32)


def test_gradient_matches_transformers():
    pos = distinct_positions(2, 6)
    cos, sin, attn = hf_tables(32, pos, torch.float32,
                               {"rope_type": "yarn", "factor": 8.0,
                                "original_max_position_embeddings": 1024})
    q0, k0 = rand((2, 3, 6, 32), torch.float32), rand((2, 1, 6, 32), torch.float32)
    gq, gk = rand(q0.shape, torch.float32), rand(k0.shape, torch.float32)
    grads = []
    for fn in (HF_LLAMA_APPLY, hf.apply_rotary_pos_emb):
        q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        oq, ok = fn(q, k, cos, sin)
        torch.autograd.backward((oq, ok), (gq, gk))
        grads.append((q.grad, k.grad))
    for ours, ref, g in zip(grads[1], grads[0], (gq, gk)):
        assert_rotated(ref, g, 32)
        pair_error_ratio(ours, ref, g, 32, torch.float32, scale=attn)


def test_torch_compile_fullgraph():
    """No graph break (fullgraph=True), inductor, same values as transformers' eager function."""
    pos = distinct_positions(2, 8)
    cos, sin, _ = hf_tables(32, pos, torch.bfloat16)
    fn = torch.compile(hf.apply_rotary_pos_emb, fullgraph=True, backend="inductor")
    for unsqueeze_dim, shape in ((1, (2, 4, 8, 32)), (2, (2, 8, 4, 32))):
        q, k = rand(shape, torch.bfloat16), rand(shape, torch.bfloat16)
        ref = HF_LLAMA_APPLY(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        out = fn(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        for o, r, x in zip(out, ref, (q, k)):
            pair_error_ratio(o, r, x, 32, torch.bfloat16)


def test_bad_input_raises_clear_errors():
    pos = distinct_positions(2, 5)
    cos, sin, _ = hf_tables(16, pos, torch.float32)
    q, k = rand((2, 3, 5, 16), torch.float32), rand((2, 3, 5, 16), torch.float32)
    f = hf.apply_rotary_pos_emb
    for bad in (0, 3, -1, 1.0, True, "1"):
        with pytest.raises(ValueError, match="unsqueeze_dim"):
            f(q, k, cos, sin, unsqueeze_dim=bad)
    with pytest.raises(ValueError, match="cos and sin must have the same shape"):
        f(q, k, cos, sin[..., :8])
    with pytest.raises(ValueError, match="3-D"):
        f(q, k, cos[0], sin[0])
    with pytest.raises(ValueError, match="rotary_dim"):
        f(q, k, cos[..., :7], sin[..., :7])
    big_c, big_s, _ = hf_tables(32, pos, torch.float32)
    with pytest.raises(ValueError, match="must not exceed head_dim"):
        f(q, k, big_c, big_s)
    with pytest.raises(ValueError, match="batch"):
        f(q[:1], k[:1], cos, sin)
    with pytest.raises(ValueError, match="seq"):
        f(q[:, :, :4], k[:, :, :4], cos, sin)
    with pytest.raises(ValueError, match="seq"):  # q/k laid out for the other unsqueeze_dim
        f(q, k, cos, sin, unsqueeze_dim=2)
    with pytest.raises(ValueError, match="4-D"):
        f(q[0], k[0], cos, sin)
    with pytest.raises(TypeError, match="same dtype"):
        f(q, k.double(), cos, sin)
    with pytest.raises(TypeError, match="floating-point"):
        f(q.long(), k.long(), cos, sin)
    with pytest.raises(TypeError, match="cos must be a torch.Tensor"):
        f(q, k, cos.tolist(), sin)


def test_import_does_not_load_transformers():
    import subprocess

    code = ("import sys, rope_ext, rope_ext.hf; "
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------
# patch() / unpatch()


def test_patch_names_what_it_patched_and_unpatch_restores_originals():
    _module("olmo2")
    expected = [f"transformers.models.{f}.modeling_{f}" for f in FAMILIES]
    result = hf.patch()  # every discovered module: the imported ones now
    fused = [f"transformers.models.{f}.modeling_{f}.{s.cls_name}"
             for f, s in hf.FUSED_MODEL_TYPES.items()]
    assert sorted(result.fused) == sorted(fused)
    assert not any(k.startswith(tuple(expected)) for k in result.skipped), result.skipped
    for name in expected:
        assert name in result and name in result.newly_patched
        assert sys.modules[name].apply_rotary_pos_emb is hf.apply_rotary_pos_emb
    assert set(result) == set(hf.report().patched)
    again = hf.patch()  # idempotent: nothing new, originals kept
    assert set(again) == set(result) and again.newly_patched == ()
    restored = hf.unpatch()  # the modules, and the fused attention classes
    assert sorted(restored) == sorted(set(result) | set(result.fused))
    for name in expected:
        assert sys.modules[name].apply_rotary_pos_emb is TRUE_ORIGINALS[name]
    assert hf.unpatch() == [] and not hf.report().patched


def test_patch_by_name_list_alias_and_partial_unpatch():
    r = hf.patch("llama")
    assert list(r) == ["transformers.models.llama.modeling_llama"]
    assert hf.is_patched("llama") and not hf.is_patched("qwen2")
    r = hf.patch(["qwen2", "gemma3_text", "llama"])
    assert list(r) == ["transformers.models.qwen2.modeling_qwen2",
                       "transformers.models.gemma3.modeling_gemma3",
                       "transformers.models.llama.modeling_llama"]
    assert list(r.newly_patched) == r[:2]
    assert hf.unpatch("qwen2") == ["transformers.models.qwen2.modeling_qwen2"]
    assert hf.is_patched("llama") and hf.is_patched("gemma3") and not hf.is_patched("qwen2")


def test_patch_rejects_unknown_and_unsupported_model_types():
    with pytest.raises(ValueError, match="model_type 'not_a_model'"):
        hf.patch("not_a_model")
    # SAM 2 video's RoPE functions (2-D, keys partly unrotated) are none of the forms
    with pytest.raises(RuntimeError, match="model_type .sam2_video.*none of the verified forms"):
        hf.patch(["llama", "sam2_video"])
    with pytest.raises(TypeError, match="model_types"):
        hf.patch(7)
    assert not hf.is_patched("llama")  # nothing patched by a refused call


def test_source_check_refuses_a_different_meaning():
    """The form check is able to say no: Llama's function with an adjacent-pairs rotate_half
    (Cohere's) is not the Llama form, and a changed expression is no form at all."""
    import ast
    import inspect

    from rope_ext.hf import registry

    src = inspect.getsource(_module("llama"))
    matched, left = registry.verify(ast.parse(src))
    assert list(matched) == ["apply_rotary_pos_emb"] and left == {}
    cohere_rotate = inspect.getsource(_module("cohere").rotate_half)
    llama_rotate = inspect.getsource(_module("llama").rotate_half)
    matched, left = registry.verify(ast.parse(src.replace(llama_rotate, cohere_rotate)))
    assert matched == {} and "rotate_half is not the one" in left["apply_rotary_pos_emb"]
    changed = src.replace("q_embed = (q * cos) + (rotate_half(q) * sin)",
                          "q_embed = (q * cos) - (rotate_half(q) * sin)")
    assert changed != src
    matched, left = registry.verify(ast.parse(changed))
    assert matched == {} and left == {"apply_rotary_pos_emb": "its code is none of the verified "
                                                              "forms"}


def test_context_managers():
    hf.patch("qwen2")
    with hf.patched(["llama", "qwen2"]) as r:
        assert list(r.newly_patched) == ["transformers.models.llama.modeling_llama"]
        assert hf.is_patched("llama") and hf.is_patched("qwen2")
    assert not hf.is_patched("llama") and hf.is_patched("qwen2")  # only what it patched
    assert not hasattr(hf.patch("mistral"), "__enter__")  # one context manager: patched()
    assert hf.is_patched("mistral")


# ---------------------------------------------------------------------------------------------
# tiny random models

MOE = dict(num_experts_per_tok=2)
EXTRA = {
    "mixtral": dict(MOE, num_local_experts=4),
    "qwen2_moe": dict(MOE, num_experts=4, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32),
    "qwen3_moe": dict(MOE, num_experts=4, moe_intermediate_size=32),
    "olmoe": dict(MOE, num_experts=4),
    "granitemoe": dict(MOE, num_local_experts=4),
    "phi3": dict(partial_rotary_factor=0.5),
    "gpt_neox": dict(rotary_pct=0.25),
    "falcon": dict(new_decoder_architecture=True, num_kv_heads=2),
}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 128}


def tiny_model(fam, **overrides):
    return tiny_models.tiny_model(fam, {**EXTRA.get(fam, {}), **overrides})


def run_counting_original(monkeypatch, fam, fn):
    """Run fn with transformers' own function wrapped to count its calls."""
    mod = _module(fam)
    calls = []
    orig = mod.apply_rotary_pos_emb
    assert orig is TRUE_ORIGINALS[mod.__name__]

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return orig(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(mod, "apply_rotary_pos_emb", counting)
        out = fn()
    return out, len(calls)


@pytest.mark.parametrize("fam", FAMILIES)
def test_every_supported_family_eager(fam, monkeypatch, count_calls):
    model = tiny_model(fam).eval()
    ids, pos = inputs()
    with torch.no_grad():
        ref, n_hf = run_counting_original(
            monkeypatch, fam, lambda: model(ids, position_ids=pos).logits)
        assert n_hf >= 1
        with hf.patched(fam) as result:
            assert list(result) == [f"transformers.models.{fam}.modeling_{fam}"]
            count_calls.clear()  # the fused forward's patch-time probe, if it ran now
            out = model(ids, position_ids=pos).logits
        if result.fused:  # Qwen3, Gemma 3: norms + RoPE in rope_ext.rms_norm_rope_qk (see
            assert count_calls == []  # tests/test_hf_fused.py), transformers' function unused
        else:
            assert len(count_calls) == n_hf  # every rotary call went through rope_ext
        back = model(ids, position_ids=pos).logits
    assert rel_err(out, ref) <= 1e-5
    assert torch.equal(back, ref)  # unpatched: transformers' own arithmetic again, bit for bit


MODEL_CASES = {
    "llama": ("llama", {}),
    "llama-yarn": ("llama", {"rope_parameters": YARN}),  # A = 1.139 inside HF's table
    "qwen2": ("qwen2", {}),
    "gpt_neox-partial": ("gpt_neox", {}),  # rotary_pct 0.25: r = 4 of head_dim 16
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_tiny_model_logits_and_gradients_eager(case, monkeypatch, count_calls):
    fam, overrides = MODEL_CASES[case]
    model = tiny_model(fam, **overrides).train()
    if "rope_parameters" in overrides:
        assert model.model.rotary_emb.attention_scaling > 1.1
    ids, pos = inputs()
    (ref_logits, ref_grads), n_hf = run_counting_original(
        monkeypatch, fam, lambda: grads_of(model, ids, pos))
    hf.patch(fam)
    logits, grads = grads_of(model, ids, pos)
    assert len(count_calls) == n_hf >= 2
    assert rel_err(logits, ref_logits) <= 1e-5
    assert_grads_close(grads, ref_grads, rel=1e-4)
    hf.unpatch()
    back_logits, _ = grads_of(model, ids, pos)
    assert torch.equal(back_logits, ref_logits)


@pytest.mark.parametrize("case", ["llama-yarn", "qwen2", "gpt_neox-partial"])
def test_tiny_model_under_torch_compile(case, count_calls):
    """The whole model under torch.compile (aot_eager: inductor takes ~30 s per graph on this
    CPU; inductor is covered by test_torch_compile_fullgraph): logits and gradients equal
    transformers' eager ones, and the traced graph called rope_ext."""
    fam, overrides = MODEL_CASES[case]
    model = tiny_model(fam, **overrides).train()
    ids, pos = inputs()
    ref_logits, ref_grads = grads_of(model, ids, pos)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="aot_eager")
        hf.patch(fam)
        logits, grads = grads_of(model, ids, pos, forward=compiled)
        assert len(count_calls) >= 2  # traced through rope_ext.hf.apply_rotary_pos_emb
        assert rel_err(logits, ref_logits) <= 1e-5
        assert_grads_close(grads, ref_grads, rel=1e-4)
        # Unpatching after compiling: dynamo guards on the global, so the compiled model
        # goes back to transformers' function.
        hf.unpatch()
        n = len(count_calls)
        back_logits, _ = grads_of(model, ids, pos, forward=compiled)
        assert len(count_calls) == n
        assert rel_err(back_logits, ref_logits) <= 1e-5
    finally:
        torch._dynamo.reset()


def test_patch_after_compile_takes_effect(count_calls):
    """A model compiled before patch() picks the patch up: dynamo guards on the module global
    apply_rotary_pos_emb and re-traces when it changes."""
    model = tiny_model("llama").eval()
    ids, pos = inputs()
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="aot_eager")
        with torch.no_grad():
            ref = compiled(ids, position_ids=pos).logits
            assert count_calls == []
            with hf.patched("llama"):
                out = compiled(ids, position_ids=pos).logits
            assert len(count_calls) == 2
    finally:
        torch._dynamo.reset()
    assert rel_err(out, ref) <= 1e-5


def test_patch_everything_imports_nothing_and_hooks_later_imports():
    """patch() with no argument patches the modules already imported and leaves the others
    to an import hook: transformers is not even imported by it. unpatch() removes the hook."""
    import subprocess

    code = """if True:
        import sys, rope_ext.hf as hf
        from rope_ext.hf import registry
        r = hf.patch()
        assert "transformers" not in sys.modules, "patch() imported transformers"
        assert list(r) == [] and r.pending == registry.discovered(), r.pending
        assert len(r.pending) > 150
        from transformers.models.llama import modeling_llama
        from transformers.models.gpt_neox import modeling_gpt_neox
        assert modeling_llama.apply_rotary_pos_emb is hf.apply_rotary_pos_emb
        assert hf.is_patched("gpt_neox") and not hf.is_patched("qwen2")  # qwen2: not imported
        assert "transformers.models.qwen2.modeling_qwen2" not in sys.modules
        assert sorted(hf.unpatch()) == [modeling_gpt_neox.__name__, modeling_llama.__name__]
        assert modeling_llama.apply_rotary_pos_emb is not hf.apply_rotary_pos_emb
        assert registry.hook not in sys.meta_path
        from transformers.models.qwen2 import modeling_qwen2  # imported after unpatch: left alone
        assert modeling_qwen2.apply_rotary_pos_emb is not hf.apply_rotary_pos_emb
        with hf.patched():
            from transformers.models.mistral import modeling_mistral
            assert hf.is_patched("mistral")
        assert not hf.is_patched("mistral") and registry.hook not in sys.meta_path
    """
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_warnings_when_patching_everything():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf.patch()


def test_families_document_is_the_report():
    """docs/hf_families.md (the patched families the README points to) is what
    `python -m rope_ext.hf` writes for the installed transformers: generated, not typed."""
    import subprocess

    doc = os.path.join(os.path.dirname(__file__), "..", "docs", "hf_families.md")
    out = subprocess.run([sys.executable, "-m", "rope_ext.hf"], check=True, capture_output=True,
                         text=True).stdout
    assert out == open(doc).read(), "docs/hf_families.md is stale: run `make hf-families`"
    assert "| `Qwen3Attention` | qwen3 |" in out
    patched_rows = out[out.index("## Patched, by form"):out.index("## Fused")].splitlines()
    patched_types = {t.strip() for row in patched_rows if row.startswith("| ")
                     for t in row.split("|")[3].split(",")}
    for model_type in ("llama4_text", "gemma4_text", "gpt_oss", "deepseek_v3", "glm4", "cohere2",
                       "ernie4_5", "qwen3_5_text", "olmo3", "gptj", "deepseek_v2", "qwen2_5_vl"):
        assert model_type in patched_types, model_type
