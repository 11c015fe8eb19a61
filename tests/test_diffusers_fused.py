"""rope_ext.diffusers' fused QK-RMSNorm + RoPE processors (Flux, Wan, Qwen-Image).

a) hooks on the norm modules fire exactly as unpatched (forward pre-hooks, forward hooks,
   full backward hooks; hooks that change values; global module hooks; a norm of another
   class), with the same outputs and gradients, and report().fallbacks names the reason;
   without hooks the fused op runs and nothing falls back;
b) the norms' math: eps that differ between q and k, a diffusers RMSNorm whose weight dtype
   would change the result's dtype, run unfused with diffusers' values;
c) the patch-time probe refuses a processor that computes something else;
d) torch.compile (aot_eager, to keep it fast on the CPU): the whole Flux and Wan
   transformers with fullgraph=True, forward and the training step's gradients equal the
   eager unpatched ones, and the traced graphs hold the op.
Tiny models and helpers are tests/test_diffusers.py's.
"""

import importlib

import pytest
import torch

pytest.importorskip("diffusers")
# Chroma imports FluxPosEmbed from its deprecated home: diffusers' warning, not ours
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

import rope_ext  # noqa: E402
import rope_ext.diffusers as rd  # noqa: E402
from rope_ext.diffusers import _fused  # noqa: E402
from test_diffusers import (Calls, assert_grads_close, output, rel_err, tiny,  # noqa: E402
                            train_step)

T = "diffusers.models.transformers."
FUSED = {"flux": T + "transformer_flux.FluxAttnProcessor",
         "wan": T + "transformer_wan.WanAttnProcessor",
         "qwenimage": T + "transformer_qwenimage.QwenDoubleStreamAttnProcessor2_0"}


@pytest.fixture(autouse=True)
def _clean_patch_state():
    rd.unpatch()
    yield
    rd.unpatch()


def norm_modules(model):
    return [m for name, m in model.named_modules()
            if name.rsplit(".", 1)[-1] in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")]


class HookCounts:
    """Forward pre-hooks, forward hooks and full backward hooks on every q/k norm module,
    counting their calls; `scale` makes the forward hook change the output."""

    def __init__(self, norms, scale=None):
        self.pre = self.fwd = self.bwd = 0
        self.handles = []
        for m in norms:
            self.handles.append(m.register_forward_pre_hook(self._pre))
            self.handles.append(m.register_forward_hook(self._fwd(scale)))
            self.handles.append(m.register_full_backward_hook(self._bwd))

    def _pre(self, module, args):
        self.pre += 1

    def _fwd(self, scale):
        def hook(module, args, out):
            self.fwd += 1
            return out * scale if scale is not None else None
        return hook

    def _bwd(self, module, grad_in, grad_out):
        self.bwd += 1

    def counts(self):
        return self.pre, self.fwd, self.bwd

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("scale", [None, 1.5])
@pytest.mark.parametrize("fam", ["flux", "wan", "qwenimage"])
def test_hooks_fire_as_unpatched(fam, scale, monkeypatch):
    model, kw = tiny(fam)
    model.train()
    hooks = HookCounts(norm_modules(model), scale)
    ref_out, ref_grads = train_step(model, kw)
    ref_counts = hooks.counts()
    assert min(ref_counts) > 0
    hooks.pre = hooks.fwd = hooks.bwd = 0
    calls = Calls(monkeypatch)
    with rd.patched(fam):
        calls.reset()
        out, grads = train_step(model, kw)
        assert calls.fused == 0  # every layer ran unfused: its norm modules have hooks
        assert "hook" in rd.report().fallbacks[FUSED[fam]]
    assert hooks.counts() == ref_counts
    assert rel_err(out, ref_out) <= 1e-5
    assert_grads_close(grads, ref_grads)
    # hooks gone: fused again, nothing falls back
    hooks.remove()
    with rd.patched(fam):
        calls.reset()
        assert not rd.report().fallbacks
        train_step(model, kw)
        assert calls.fused > 0 and not rd.report().fallbacks


def test_global_hook_and_other_norm_class(monkeypatch):
    model, kw = tiny("flux")
    with torch.no_grad():
        ref = output(model, kw)
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, a, o: seen.append(type(m).__name__) if "RMSNorm" in type(m).__name__ else None)
    try:
        with torch.no_grad():
            output(model, kw)
        want = list(seen)
        seen.clear()
        with rd.patched("flux"), torch.no_grad():
            out = output(model, kw)
            assert "global module hook" in rd.report().fallbacks[FUSED["flux"]]
    finally:
        handle.remove()
    assert seen == want and rel_err(out, ref) <= 1e-5

    class ScaledNorm(torch.nn.RMSNorm):
        def forward(self, x):
            return super().forward(x) * 1.25

    attn = model.transformer_blocks[0].attn
    other = ScaledNorm(attn.norm_q.normalized_shape, eps=attn.norm_q.eps)
    other.load_state_dict(attn.norm_q.state_dict())
    attn.norm_q = other
    with torch.no_grad():
        ref = output(model, kw)
    calls = Calls(monkeypatch)
    with rd.patched("flux"), torch.no_grad():
        out = output(model, kw)
        assert "not a class verified" in rd.report().fallbacks[FUSED["flux"]]
    assert rel_err(out, ref) <= 1e-5
    assert calls.fused == 1  # the single-stream block: its norms are torch's RMSNorm


def test_eps_and_weight_dtype_run_unfused(monkeypatch):
    """A norm pair with different eps (one op call has one eps), and diffusers' RMSNorm with
    a float32 weight for bf16 inputs (its result would be float32): normalized by the
    modules and rotated by the op, diffusers' values."""
    model, kw = tiny("flux")
    attn = model.single_transformer_blocks[0].attn
    attn.norm_k.eps = 1e-3
    with torch.no_grad():
        ref = output(model, kw)
    calls = Calls(monkeypatch)
    with rd.patched("flux"), torch.no_grad():
        out = output(model, kw)
        assert "eps" in rd.report().fallbacks[FUSED["flux"]]
    assert rel_err(out, ref) <= 1e-5
    assert calls.fused == 2 and calls.rope == 2  # the double block fused, the single not

    from diffusers.models.normalization import RMSNorm

    g = torch.Generator().manual_seed(0)
    nq, nk = RMSNorm(8, eps=1e-6), RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        nq.weight.copy_(torch.randn(8, generator=g))
        nk.weight.copy_(torch.randn(8, generator=g))
    _fused.norm_forwards["probe"] = (RMSNorm.forward,)
    q = torch.randn(2, 5, 3, 8, generator=g).to(torch.bfloat16)
    k = torch.randn(2, 5, 3, 8, generator=g).to(torch.bfloat16)
    angles = torch.rand(5, 4, generator=g) * 6
    got = _fused._norm_rope(q, k, angles.cos(), angles.sin(), nq, nk, False, "probe", False)
    want = [rope_ext.apply_rope(n(x), angles.cos(), angles.sin(), interleaved=True)
            for n, x in ((nq, q), (nk, k))]
    assert all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(got, want))
    assert "float32" in _fused.fallbacks.pop("probe")


def test_probe_refuses_a_processor_that_computes_something_else():
    """The patch-time probe runs the fused __call__ against the processor's own on a tiny
    random instance: an unfused path whose norms mean something else is caught."""
    flux = importlib.import_module(T + "transformer_flux")
    cls = flux.FluxAttnProcessor
    original = cls.__dict__["__call__"]
    spec = _fused.SPECS["flux"]
    assert _fused.probe(spec, flux, cls, original, "probe")[0] is None

    def other(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
              image_rotary_emb=None):
        norm_k = attn.norm_k
        attn.norm_k = attn.norm_q  # k normalized with q's weights
        try:
            return original(self, attn, hidden_states, encoder_hidden_states, attention_mask,
                            image_rotary_emb)
        finally:
            attn.norm_k = norm_k

    why, _ = _fused.probe(spec, flux, cls, other, "probe")
    assert why is not None and "different output" in why


def capturing_aot_eager(graphs):
    from torch._dynamo.backends.registry import lookup_backend

    aot_eager = lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)
    return backend


def _op_targets(graphs):
    return {str(node.target) for gm in graphs for node in gm.graph.nodes
            if node.op == "call_function" and "rope" in str(node.target)}


@pytest.mark.parametrize("fam", ["flux", "wan"])
def test_whole_model_under_torch_compile(fam):
    """torch.compile(fullgraph=True) of the whole tiny transformer, patched and fused, in
    train mode: output and every parameter gradient equal diffusers' eager ones; the graph
    holds the fused op (diffusers' code traces without a graph break)."""
    model, kw = tiny(fam)
    model.train()
    ref_out, ref_grads = train_step(model, kw)
    torch._dynamo.reset()
    graphs = []
    with rd.patched(fam):
        compiled = torch.compile(model, fullgraph=True, backend=capturing_aot_eager(graphs))
        out, grads = train_step(compiled, kw)
    torch._dynamo.reset()
    assert rel_err(out, ref_out) <= 1e-5
    assert_grads_close({n.replace("_orig_mod.", ""): g for n, g in grads.items()}, ref_grads)
    assert any("rms_norm_rope_qk" in t for t in _op_targets(graphs))


def test_attention_call_under_torch_compile_fullgraph():
    """The fused processor call alone under fullgraph=True (with and without the fused path:
    a hooked norm runs the unfused one), forward and backward."""
    model, kw = tiny("wan")
    attn = model.blocks[0].attn1
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 8, attn.inner_dim, generator=g, requires_grad=True)
    fc, fs = model.rope(kw["hidden_states"])

    def call(h):
        return attn(h, None, None, (fc, fs))

    ref = call(hidden)
    (ref_grad,) = torch.autograd.grad(ref.sum(), hidden)
    for hooked in (False, True):
        handle = attn.norm_q.register_forward_hook(lambda m, a, o: None) if hooked else None
        torch._dynamo.reset()
        graphs = []
        with rd.patched("wan"):
            out = torch.compile(call, fullgraph=True, backend=capturing_aot_eager(graphs))(hidden)
            (grad,) = torch.autograd.grad(out.sum(), hidden)
        if handle is not None:
            handle.remove()
        assert rel_err(out.detach(), ref.detach()) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5
        ops = _op_targets(graphs)
        assert any(("rms_norm_rope_qk" in t) != hooked for t in ops), ops
    torch._dynamo.reset()

