"""rope_ext.hf's fused QK-RMSNorm + RoPE attention forward (Qwen3, OLMo 2, Gemma 3).

patch("qwen3" / "olmo2" / "gemma3") replaces the attention class's forward by one that calls
rope_ext.rms_norm_rope_qk on the [b, s, h, d] views of the q/k projections. Checked here:

a) tiny random models (float32, norm weights randomized so they matter): patched logits and
   gradients of every parameter (norm weights included) equal transformers' own, eval and
   train, the op ran once per layer; a cached decode equals the full forward; the whole model
   under torch.compile (aot_eager) gives the same logits and gradients.
b) the op against each model's own norm + rotary code in bfloat16: q_norm/k_norm modules and
   the modeling module's apply_rotary_pos_emb used exactly where the attention forward uses
   them, on the model's own bf16 cos/sin; the op is within 2 bf16 ulps of transformers (which
   rounds several times) and within one rounding of the exact float64 result.
   The whole tiny model in bfloat16, patched, against transformers' own bf16 logits.
c) unpatch / patched() restore the exact forward objects; a transformers whose norm or
   attention call differs from what the fused forward assumes is refused with a clear message;
   without the op in the build, the forwards stay transformers'.

The tiny models, their inputs and the comparisons are tests/tiny_models.py's.
"""

import importlib

import pytest
import torch

import transformers

import rope_ext
import rope_ext.hf as hf
import tiny_models
from tiny_models import grads_of, inputs, rel_err

transformers.logging.set_verbosity_error()

FAMS = list(hf.FUSED_MODEL_TYPES)
# where each family's attention applies q_norm/k_norm, as in test_op_matches_model_norm_and_rope_bf16
NORM_ON = {"qwen3": "view", "glm4_moe": "view", "qwen3_next": "view", "qwen3_5": "view",
           "qwen3_5_moe": "view", "olmo2": "flat", "olmo3": "flat", "gemma3": "transposed",
           "apertus": "transposed", "exaone4": "transposed"}
MODULES = {f: importlib.import_module(f"transformers.models.{f}.modeling_{f}") for f in FAMS}
CLASSES = {f: getattr(MODULES[f], hf.FUSED_MODEL_TYPES[f].cls_name) for f in FAMS}
TRUE_FORWARD = {f: CLASSES[f].__dict__["forward"] for f in FAMS}  # before any test patches
TRUE_APPLY = {f: MODULES[f].apply_rotary_pos_emb for f in FAMS}
CLASS_NAME = {f: f"{MODULES[f].__name__}.{CLASSES[f].__name__}" for f in FAMS}


@pytest.fixture(autouse=True)
def _clean_patch_state():
    hf.unpatch()
    yield
    hf.unpatch()
    for f in FAMS:  # no test may leave anything behind
        assert CLASSES[f].__dict__["forward"] is TRUE_FORWARD[f], f
        assert MODULES[f].apply_rotary_pos_emb is TRUE_APPLY[f], f


@pytest.fixture
def op_calls(monkeypatch):
    """Counts rope_ext.rms_norm_rope_qk calls (the fused forward looks it up on rope_ext at
    call time). Install after patch(): patch's probe calls the op too."""
    calls = []
    real = rope_ext.rms_norm_rope_qk

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    def install():
        monkeypatch.setattr(rope_ext, "rms_norm_rope_qk", counting)
        return calls

    return install


# ---------------------------------------------------------------------------------------------
# tiny random models

EXTRA = tiny_models.FUSED_EXTRA


def tiny_model(fam, dtype=torch.float32):
    return tiny_models.tiny_model(fam, EXTRA[fam], randomize_norms=True, dtype=dtype)


def assert_grads_close(ours, ref):
    tiny_models.assert_grads_close(ours, ref, rel=1e-5)
    norm_grads = [name for name in ref if "q_norm" in name or "k_norm" in name]
    assert len(norm_grads) == 4  # q_norm and k_norm of both layers
    for name in norm_grads:
        assert float(ref[name].abs().max()) > 0, name  # the norm weights really get a gradient


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("fam", FAMS)
def test_logits_and_gradients_eager(fam, mode, op_calls):
    model = tiny_model(fam).train(mode == "train")
    ids, pos = inputs()
    ref_logits, ref_grads = grads_of(model, ids, pos)
    result = hf.patch(fam)
    assert result.fused == (CLASS_NAME[fam],) and result.newly_fused == result.fused
    assert hf.is_patched(fam)
    calls = op_calls()
    logits, grads = grads_of(model, ids, pos)
    assert len(calls) == 2  # once per layer: the norms and RoPE of q and k in one call
    assert rel_err(logits, ref_logits) <= 1e-5
    assert_grads_close(grads, ref_grads)
    hf.unpatch()
    back_logits, _ = grads_of(model, ids, pos)
    assert torch.equal(back_logits, ref_logits)  # transformers' own arithmetic again


@pytest.mark.parametrize("fam", FAMS)
def test_cached_decode_matches_full_forward(fam, op_calls):
    """Prefill 6 tokens, then decode 3 one at a time through the KV cache (positions from the
    cache, cos/sin of one token): the logits equal transformers' full forward."""
    model = tiny_model(fam).eval()
    ids, _ = inputs(batch=2, seq=9)
    with torch.no_grad():
        ref = model(ids).logits
        hf.patch(fam)
        calls = op_calls()
        out = model(ids[:, :6], use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        for t in range(6, 9):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    assert len(calls) == 2 * 4
    assert rel_err(torch.cat(steps, dim=1), ref) <= 1e-5


@pytest.mark.parametrize("fam", FAMS)
def test_whole_model_under_torch_compile(fam, op_calls):
    """torch.compile of the whole model (aot_eager: inductor takes ~30 s per graph on this
    CPU), train mode: logits and gradients equal transformers' eager ones and the traced
    graph went through the op."""
    model = tiny_model(fam).train()
    ids, pos = inputs()
    ref_logits, ref_grads = grads_of(model, ids, pos)
    hf.patch(fam)
    calls = op_calls()
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="aot_eager")
        logits, grads = grads_of(model, ids, pos, forward=compiled)
        assert len(calls) >= 2  # traced through the fused forward
        assert rel_err(logits, ref_logits) <= 1e-5
        assert_grads_close(grads, ref_grads)
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# the op against each model's own norm + rotary code, bfloat16

BF16_U = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)


@pytest.mark.parametrize("fam", FAMS)
def test_op_matches_model_norm_and_rope_bf16(fam):
    model = tiny_model(fam, torch.bfloat16)
    spec = hf.FUSED_MODEL_TYPES[fam]
    attn = model.model.layers[0].self_attn
    batch, seq, hq, hk = 2, 7, 4, 2
    d = tiny_models.COMMON["head_dim"]
    g = torch.Generator().manual_seed(3)
    # q and k as the attention holds them: [b, s, h, d] views of the projections.
    proj_q = (3.0 * torch.randn(batch, seq, hq * d, generator=g)).bfloat16()
    proj_k = (3.0 * torch.randn(batch, seq, hk * d, generator=g)).bfloat16()
    q, k = proj_q.view(batch, seq, hq, d), proj_k.view(batch, seq, hk, d)
    pos = torch.stack([torch.arange(seq), torch.randint(0, 200, (seq,), generator=g)])
    # as the model makes them (Gemma 3: the table of the layer's type): bf16, but float32 in
    # OLMo 2, whose rotary module does not cast (its apply_rotary_pos_emb casts back instead)
    import inspect

    takes_layer_type = "layer_type" in inspect.signature(model.model.rotary_emb.forward).parameters
    extra = {"layer_type": model.config.layer_types[attn.layer_idx]} if takes_layer_type else {}
    rope_pos = pos.expand(3, *pos.shape) if fam in ("qwen3_5", "qwen3_5_moe") else pos  # MRoPE
    cos, sin = model.model.rotary_emb(proj_q, rope_pos, **extra)
    if fam == "olmo2":  # its rotary module does not cast
        assert cos.dtype == torch.float32

    with torch.no_grad():
        if NORM_ON[fam] == "view":  # norm on the [b, s, h, d] view, then transpose
            rq, rk = attn.q_norm(q).transpose(1, 2), attn.k_norm(k).transpose(1, 2)
        elif NORM_ON[fam] == "flat":  # norm on the flat projection, then view and transpose
            rq = attn.q_norm(proj_q).view(batch, seq, hq, d).transpose(1, 2)
            rk = attn.k_norm(proj_k).view(batch, seq, hk, d).transpose(1, 2)
        else:  # transpose, then norm
            rq, rk = attn.q_norm(q.transpose(1, 2)), attn.k_norm(k.transpose(1, 2))
        ref_q, ref_k = TRUE_APPLY[fam](rq, rk, cos, sin)

        c, s = hf.forms.table_from_hf(cos, sin, seq)
        eps = getattr(attn.q_norm, spec.eps_attr)
        out_q, out_k = rope_ext.rms_norm_rope_qk(
            q, k, c, s, q_weight=attn.q_norm.weight, k_weight=attn.k_norm.weight, eps=eps,
            across_heads=spec.across_heads, weight_offset=spec.weight_offset, layout="bshd")

    for out, ref, x, w in ((out_q, ref_q, q, attn.q_norm.weight),
                           (out_k, ref_k, k, attn.k_norm.weight)):
        out = out.transpose(1, 2)
        assert out.dtype == ref.dtype == torch.bfloat16 and out.shape == ref.shape
        torch.testing.assert_close(out.float(), ref.float(), atol=1.6e-2, rtol=1.6e-2)
        # The exact value, in float64 from the same bf16 inputs, weights and table.
        xd = x.double()
        if spec.across_heads:
            flat = xd.flatten(-2)
            nd = (flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + eps)).view(xd.shape)
            wd = w.double().view(x.shape[-2:])
        else:
            nd = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
            wd = w.double()
        nd = nd * (wd + spec.weight_offset)
        cd, sd = c.double()[:, :, None], s.double()[:, :, None]
        half = c.shape[-1]  # r / 2: GLM-4.5 rotates half of each head
        x1, x2, tail = nd[..., :half], nd[..., half:2 * half], nd[..., 2 * half:]
        exact = torch.cat((x1 * cd - x2 * sd, x2 * cd + x1 * sd, tail), dim=-1).transpose(1, 2)
        assert (ref.double() - x.transpose(1, 2).double()).abs().max() > 0.1  # not vacuous
        # one rounding from float32 math: within u (plus float32 noise) of the exact value
        err = (out.double() - exact).abs()
        assert (err <= BF16_U * exact.abs() * 1.01 + 1e-5).all(), float(err.max())
        err_hf = (ref.double() - exact).abs().max()
        assert err.max() <= err_hf  # transformers' several roundings are never closer


@pytest.mark.parametrize("fam", FAMS)
def test_patched_bf16_model_matches_transformers(fam):
    """The whole tiny model in bfloat16, patched against transformers' own attention code: the
    fused forward's bf16 path (bf16 weights, the model's bf16 or float32 cos/sin turned into
    the op's table) gives logits within bf16 rounding of transformers' (their two roundings of
    the same float32 model: 1.0-1.5% of the largest logit apart here), and no farther from the
    float32 model's logits than transformers' own bf16 logits are (within 1.5x: each rounds
    differently, neither is exact)."""
    ids, pos = inputs()
    with torch.no_grad():
        exact = tiny_model(fam).eval()(ids, position_ids=pos).logits
        model = tiny_model(fam, torch.bfloat16).eval()
        ref = model(ids, position_ids=pos).logits
        hf.patch(fam)
        out = model(ids, position_ids=pos).logits
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) <= 2.0**-5
    assert rel_err(out, exact) <= 1.5 * rel_err(ref, exact)


# ---------------------------------------------------------------------------------------------
# unpatch, patched(), refusal


def test_unpatch_and_patched_restore_the_exact_forwards():
    r = hf.patch(["qwen3", "olmo2", "gemma3_text"])
    assert set(r.fused) == {CLASS_NAME[f] for f in ("qwen3", "olmo2", "gemma3")}
    for f in ("qwen3", "olmo2", "gemma3"):
        assert CLASSES[f].__dict__["forward"] is not TRUE_FORWARD[f]
    # each module's own function is replaced as well (OLMo 2's casts back to q's dtype)
    assert MODULES["olmo2"].apply_rotary_pos_emb is hf.forms.apply_rotary_pos_emb_cast_back
    assert MODULES["qwen3"].apply_rotary_pos_emb is hf.apply_rotary_pos_emb
    again = hf.patch("qwen3")  # idempotent, the true original kept
    assert again.newly_fused == () and again.fused == (CLASS_NAME["qwen3"],)
    restored = hf.unpatch("olmo2")
    assert restored == [MODULES["olmo2"].__name__, CLASS_NAME["olmo2"]]
    assert not hf.is_patched("olmo2")
    assert CLASSES["olmo2"].__dict__["forward"] is TRUE_FORWARD["olmo2"]
    restored = hf.unpatch()
    assert set(restored) == {CLASS_NAME["qwen3"], CLASS_NAME["gemma3"],
                             MODULES["qwen3"].__name__, MODULES["gemma3"].__name__}
    for f in FAMS:
        assert CLASSES[f].__dict__["forward"] is TRUE_FORWARD[f]
    hf.patch("gemma3")
    with hf.patched(["qwen3", "gemma3"]) as r:  # undoes only what it patched
        assert r.newly_fused == (CLASS_NAME["qwen3"],)
    assert CLASSES["qwen3"].__dict__["forward"] is TRUE_FORWARD["qwen3"]
    assert CLASSES["gemma3"].__dict__["forward"] is not TRUE_FORWARD["gemma3"]


def _norm_with_mean_subtracted(self, x):  # a LayerNorm, not an RMSNorm
    xf = x.float()
    xf = xf - xf.mean(-1, keepdim=True)
    return (self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True)
                                            + self.variance_epsilon))).to(x.dtype)


def test_refuses_a_transformers_whose_norm_differs(monkeypatch):
    monkeypatch.setattr(hf.fused, "_fused_verified", {})
    monkeypatch.setattr(MODULES["olmo2"].Olmo2RMSNorm, "forward", _norm_with_mean_subtracted)
    with pytest.raises(RuntimeError, match=r"olmo2.*Olmo2RMSNorm does not compute x \* rsqrt"):
        hf.patch(["qwen3", "olmo2"])
    assert not hf.is_patched("qwen3")  # a refused call leaves nothing patched
    r = hf.patch()
    assert "does not compute x * rsqrt" in r.skipped[CLASS_NAME["olmo2"]]
    assert "does not compute x * rsqrt" in hf.report().left_alone[CLASS_NAME["olmo2"]]
    assert CLASS_NAME["olmo2"] not in r.fused
    assert CLASS_NAME["qwen3"] in r.fused
    assert CLASSES["olmo2"].__dict__["forward"] is TRUE_FORWARD["olmo2"]


def test_refuses_a_transformers_whose_attention_call_differs(monkeypatch):
    """A release in which Gemma 3 passes softcapping to the attention function (Gemma 2 does;
    5.18's Gemma 3 does not): the probe sees the keyword arguments differ."""
    monkeypatch.setattr(hf.fused, "_fused_verified", {})
    mod = MODULES["gemma3"]
    real = TRUE_FORWARD["gemma3"]
    interfaces = mod.ALL_ATTENTION_FUNCTIONS

    class WithSoftcap:
        def get_interface(self, impl, default):
            fn = interfaces.get_interface(impl, default)
            return lambda module, *a, **kw: fn(module, *a, softcap=module.attn_logit_softcapping,
                                               **kw)

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None,
                **kwargs):
        monkeypatch.setattr(mod, "ALL_ATTENTION_FUNCTIONS", WithSoftcap())
        try:
            return real(self, hidden_states, position_embeddings, attention_mask,
                        past_key_values, **kwargs)
        finally:
            monkeypatch.setattr(mod, "ALL_ATTENTION_FUNCTIONS", interfaces)

    monkeypatch.setattr(CLASSES["gemma3"], "forward", forward)
    with pytest.raises(RuntimeError, match=r"Gemma3Attention.forward passes the attention "
                                           r"function the keyword arguments .*'softcap'"):
        hf.patch("gemma3_text")
    assert CLASSES["gemma3"].__dict__["forward"] is forward


def test_without_the_op_the_forwards_stay_transformers(monkeypatch):
    monkeypatch.delattr(rope_ext, "rms_norm_rope_qk")
    r = hf.patch("qwen3")
    assert list(r) == [MODULES["qwen3"].__name__] and r.fused == ()
    assert "rms_norm_rope_qk" in r.skipped[CLASS_NAME["qwen3"]]
    assert CLASSES["qwen3"].__dict__["forward"] is TRUE_FORWARD["qwen3"]
    r = hf.patch("olmo2")  # its own function (a cast-back form) is still replaced
    assert list(r) == [MODULES["olmo2"].__name__] and r.fused == ()
    assert CLASSES["olmo2"].__dict__["forward"] is TRUE_FORWARD["olmo2"]


def test_refuses_a_transformers_whose_forward_signature_differs(monkeypatch):
    """A release that renames the forward's cache argument (newer transformers call it
    `cache`): the fused forward would drop it, which the probe's cache-less calls would not
    show, so the signature itself is checked."""
    monkeypatch.setattr(hf.fused, "_fused_verified", {})
    real = TRUE_FORWARD["qwen3"]

    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
        return real(self, hidden_states, position_embeddings, attention_mask, cache, **kwargs)

    monkeypatch.setattr(CLASSES["qwen3"], "forward", forward)
    with pytest.raises(RuntimeError, match=r"Qwen3Attention.forward takes \(self, hidden_states, "
                                           r"position_embeddings, attention_mask, cache, kwargs\)"):
        hf.patch("qwen3")
    assert CLASSES["qwen3"].__dict__["forward"] is forward
