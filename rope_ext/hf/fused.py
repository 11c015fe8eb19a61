"""The fused QK-RMSNorm + RoPE attention forward of rope_ext.hf (Qwen3, OLMo 2, Gemma 3).

The attention classes of these families project q/k/v, RMS-normalize q and k with their
``q_norm``/``k_norm`` modules, rotate them, then run the attention. Their ``forward`` is
replaced by one that does the norms and the rotation in one ``rope_ext.rms_norm_rope_qk``
call on the ``[b, s, h, d]`` views of the projections, and the rest as transformers does.
A tiny random instance checks it against transformers' forward before the first
replacement (the probe), and every call checks that no hook or other norm class would be
skipped (else that call runs transformers' forward).
"""

import inspect
import threading
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple

import torch

import rope_ext
from rope_ext._hooks import skipped_by_standing_in
from rope_ext.hf.forms import table_from_hf as _table_from_hf

_lock = threading.RLock()  # the package's one lock (patching, unpatching, the import hook)

class _FusedSpec(NamedTuple):
    """What differs between the attention forwards that normalize q and k before RoPE.

    transformers 5.18's ``Qwen3Attention``, ``Olmo2Attention`` and ``Gemma3Attention`` project
    q/k/v, RMS-normalize q and k with ``q_norm``/``k_norm``, rotate them with the module's
    ``apply_rotary_pos_emb``, then do the same thing (cache update, the attention function from
    ``ALL_ATTENTION_FUNCTIONS``, ``o_proj``). Where the norm sits is the only difference in the
    first half, and for the math only one thing about it matters: whether it normalizes each
    head (over head_dim) or each token (over heads * head_dim).
    """
    cls_name: str  # the attention class in transformers.models.<family>.modeling_<family>
    config_name: str  # its config class there (the patch-time probe builds a tiny one)
    norm_on: str  # where transformers applies q_norm/k_norm (documentation only)
    across_heads: bool  # False: over head_dim (weights [head_dim]); True: over heads*head_dim
    weight_offset: float  # 1.0: Gemma's x * (1 + weight)
    eps_attr: str  # the RMSNorm module's epsilon attribute
    sliding_window: bool  # whether the forward passes sliding_window=self.sliding_window
    probe_config: Dict[str, object]  # family-specific settings of the probe's tiny config
    # when the model's forward normalizes and rotates q and k at all (GLM-4.5's use_qk_norm,
    # EXAONE 4's global layers without RoPE); a call where it is False runs the model's own
    fuse_if: Optional[Callable[[object], bool]] = None
    # Qwen3-Next, Qwen3.5: q_proj gives each head's q and a gate; the output is gated
    gated_q: bool = False


FUSED_MODEL_TYPES: Dict[str, _FusedSpec] = {
    "qwen3": _FusedSpec(
        "Qwen3Attention", "Qwen3Config", "each head, on the [b, s, h, d] view of the projection",
        False, 0.0, "variance_epsilon", True,
        dict(use_sliding_window=True, sliding_window=4, max_window_layers=0,
             layer_types=["sliding_attention"])),
    "olmo2": _FusedSpec(
        "Olmo2Attention", "Olmo2Config", "each token, on the flat projection [b, s, h*d]",
        True, 0.0, "variance_epsilon", False, {}),
    "gemma3": _FusedSpec(
        "Gemma3Attention", "Gemma3TextConfig", "each head, on [b, h, s, d] after the transpose",
        False, 1.0, "eps", True,
        # softcapping on: transformers 5.18's Gemma 3 does not pass it to the attention
        # function, and the probe checks that the fused forward does exactly the same.
        dict(sliding_window=4, layer_types=["sliding_attention"], attn_logit_softcapping=30.0,
             query_pre_attn_scalar=8)),
    "olmo3": _FusedSpec(
        "Olmo3Attention", "Olmo3Config", "each token, on the flat projection [b, s, h*d]",
        True, 0.0, "variance_epsilon", True,
        dict(sliding_window=4, layer_types=["sliding_attention"])),
    "apertus": _FusedSpec(
        "ApertusAttention", "ApertusConfig", "each head, on [b, h, s, d] after the transpose",
        False, 0.0, "variance_epsilon", False,
        dict(max_position_embeddings=16384)),  # above its llama3 scaling's original 8192
    "glm4_moe": _FusedSpec(
        "Glm4MoeAttention", "Glm4MoeConfig", "each head, on the [b, s, h, d] view (use_qk_norm)",
        False, 0.0, "variance_epsilon", False, dict(use_qk_norm=True),
        fuse_if=lambda attn: attn.use_qk_norm),
    "exaone4": _FusedSpec(
        "Exaone4Attention", "Exaone4Config", "each head, on [b, h, s, d] after the transpose",
        False, 0.0, "variance_epsilon", True,
        dict(sliding_window=4, layer_types=["sliding_attention"]),
        # its global layers of a hybrid model take no RoPE (NoPE): those run its own forward
        fuse_if=lambda attn: attn.sliding_window is None or attn.is_sliding),
    "qwen3_next": _FusedSpec(
        "Qwen3NextAttention", "Qwen3NextConfig", "each head, on the [b, s, h, d] view",
        False, 1.0, "eps", False, dict(layer_types=["full_attention"]), gated_q=True),
    "qwen3_5": _FusedSpec(
        "Qwen3_5Attention", "Qwen3_5TextConfig", "each head, on the [b, s, h, d] view",
        False, 1.0, "eps", False, dict(layer_types=["full_attention"]), gated_q=True),
    "qwen3_5_moe": _FusedSpec(
        "Qwen3_5MoeAttention", "Qwen3_5MoeTextConfig", "each head, on the [b, s, h, d] view",
        False, 1.0, "eps", False, dict(layer_types=["full_attention"]), gated_q=True),
}
_PROBE_CONFIG = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                     intermediate_size=32, num_hidden_layers=1, vocab_size=32,
                     max_position_embeddings=64, rms_norm_eps=1e-6, attention_dropout=0.25,
                     attention_bias=True, attn_implementation="eager", pad_token_id=None,
                     bos_token_id=None, eos_token_id=None)

_fused_originals: Dict[str, Tuple[type, object]] = {}  # class name -> (class, its own forward)
_fused_verified: Dict[str, Optional[str]] = {}  # class name -> None if verified, else why not
# class name -> the forward function of the norm class the probe verified (q_norm's and k_norm's
# class are the same one in every fused family)
_fused_norm_forwards: Dict[str, object] = {}
# class name -> why a call of its fused forward ran transformers' own forward instead (the
# first reason seen; see _hooks_or_other_norms)
_fallbacks: Dict[str, str] = {}


def _class_name(mod, spec: _FusedSpec) -> str:
    return f"{mod.__name__}.{spec.cls_name}"


def _fused_op():
    """rope_ext.rms_norm_rope_qk, looked up on the package at call time (None if this build
    of rope_ext does not have it)."""
    return getattr(rope_ext, "rms_norm_rope_qk", None)


def _hooks_or_other_norms(self, name: str) -> Optional[str]:
    """Why the fused forward must not stand in for q_norm/k_norm in this call, or None.

    The fused op computes the norms without calling the norm modules, so anything a call of
    those modules would run besides their verified forward (module hooks: tensor parallel's
    gradient all-reduce, PEFT, logging; global module hooks; a norm swapped for another class)
    would be skipped: then transformers' own forward runs for the call, which calls them.
    Without hooks this costs a few attribute reads per attention call (guards under
    torch.compile)."""
    why = skipped_by_standing_in((self.q_norm, self.k_norm), (_fused_norm_forwards.get(name),))
    if why is not None and name not in _fallbacks:
        _fallbacks[name] = why
    return why


def _fused_attention_forward(self, spec: _FusedSpec, mod, name, original, hidden_states,
                             position_embeddings, attention_mask, past_key_values, kwargs,
                             honour_hooks=True):
    q_eps = getattr(self.q_norm, spec.eps_attr)
    if ((spec.fuse_if is not None and not spec.fuse_if(self))
            or q_eps != getattr(self.k_norm, spec.eps_attr)  # one eps per op call
            or (honour_hooks and _hooks_or_other_norms(self, name))):
        return original(self, hidden_states, position_embeddings, attention_mask,
                        past_key_values, **kwargs)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)

    # [b, s, h, d] views of the projections: the op reads them in place (layout "bshd").
    if spec.gated_q:  # each head's q and output gate side by side: q is a strided view
        query_states, gate = torch.chunk(
            self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim * 2), 2, dim=-1)
        gate = gate.reshape(*input_shape, -1)
    else:
        query_states = self.q_proj(hidden_states).view(hidden_shape)
    key_states = self.k_proj(hidden_states).view(hidden_shape)
    value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

    cos, sin = position_embeddings
    c, s = _table_from_hf(cos, sin, query_states.shape[1])
    if c.dtype != query_states.dtype and c.dtype not in (torch.float32, torch.float64):
        c, s = c.float(), s.float()  # exact widening (transformers casts its table to x's dtype)
    query_states, key_states = rope_ext.rms_norm_rope_qk(
        query_states, key_states, c, s, q_weight=self.q_norm.weight, k_weight=self.k_norm.weight,
        eps=q_eps, across_heads=spec.across_heads, weight_offset=spec.weight_offset,
        layout="bshd")
    query_states = query_states.transpose(1, 2)
    key_states = key_states.transpose(1, 2)

    # From here on, transformers' forward verbatim.
    if past_key_values is not None:
        key_states, value_states = past_key_values.update(key_states, value_states,
                                                          self.layer_idx)

    attention_interface = mod.ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, mod.eager_attention_forward)
    if spec.sliding_window:
        kwargs = {"sliding_window": self.sliding_window, **kwargs}
    attn_output, attn_weights = attention_interface(
        self,
        query_states,
        key_states,
        value_states,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        **kwargs,
    )
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    if spec.gated_q:
        attn_output = attn_output * torch.sigmoid(gate)
    attn_output = self.o_proj(attn_output)
    return attn_output, attn_weights


def _make_fused_forward(spec: _FusedSpec, mod, original, honour_hooks=True):
    """The fused forward of spec.cls_name. honour_hooks=False (the patch-time probe only):
    always the fused path, whatever hooks or norm classes the instance has."""
    name = _class_name(mod, spec)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                past_key_values=None, **kwargs):
        return _fused_attention_forward(self, spec, mod, name, original, hidden_states,
                                        position_embeddings, attention_mask, past_key_values,
                                        kwargs, honour_hooks)

    forward.__qualname__ = f"{spec.cls_name}.forward"
    forward.__module__ = __name__
    forward.__doc__ = (f"rope_ext.hf's fused forward of {spec.cls_name}: q_norm/k_norm and RoPE "
                       f"in one rope_ext.rms_norm_rope_qk call, the rest as transformers' own.")
    forward._rope_ext_fused = True
    forward._rope_ext_original = original
    return forward


def _is_fused(forward) -> bool:
    return getattr(forward, "_rope_ext_fused", False) is True


def _probe_norm(norm, spec: _FusedSpec, dim: int) -> Optional[str]:
    """Whether the RMSNorm module computes x * rsqrt(mean(x^2) + eps) * (weight + offset) over
    its last dimension (of size dim), with eps read from spec.eps_attr."""
    if not hasattr(norm, spec.eps_attr):
        return f"its {type(norm).__name__} has no {spec.eps_attr!r} attribute"
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (dim,):
        return (f"its {type(norm).__name__}.weight is not a [{dim}] tensor "
                f"({'across heads' if spec.across_heads else 'per head'} expected)")
    g = torch.Generator().manual_seed(0)
    eps = 0.25  # large, with small inputs: a norm that ignores or misnames eps is caught
    x = 0.1 * torch.randn(3, dim, generator=g)
    with torch.no_grad():
        w.copy_(torch.randn(dim, generator=g))
        setattr(norm, spec.eps_attr, eps)
        got = norm(x)
    xd = x.double()
    want = (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
            * (w.double() + spec.weight_offset))
    if got.shape != want.shape or not torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6):
        return (f"its {type(norm).__name__} does not compute x * rsqrt(mean(x^2) + "
                f"{spec.eps_attr}) * ({'1 + ' if spec.weight_offset else ''}weight) over "
                f"{'heads * head_dim' if spec.across_heads else 'head_dim'}")
    return None


def _probe_fused(mod, spec: _FusedSpec) -> Tuple[Optional[str], object]:
    """(None, the norm class's forward) if the fused forward does what transformers' forward
    of spec.cls_name does, on a tiny random instance (eval and train): the same q/k/v, mask
    and keyword arguments reach the attention function, and the same output comes back;
    else (why not, None)."""
    why = _probe_fused_forward(mod, spec)
    return (why, None) if isinstance(why, str) else (None, why)


def _probe_fused_forward(mod, spec: _FusedSpec):
    """_probe_fused's work: why not (a str), or the verified norm class's forward."""
    cls = getattr(mod, spec.cls_name, None)
    if not isinstance(cls, type) or not callable(cls.__dict__.get("forward")):
        return f"it has no class {spec.cls_name} with its own forward"
    original = cls.__dict__["forward"]
    if _is_fused(original):
        original = original._rope_ext_original
    # The fused forward takes and passes on exactly these: a release that renames one (the
    # cache) or adds one would have it dropped or passed twice, which the probe's calls
    # without a cache would not show.
    params = [(p.name, p.kind) for p in inspect.signature(original).parameters.values()]
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    if params != [("self", positional), ("hidden_states", positional),
                  ("position_embeddings", positional), ("attention_mask", positional),
                  ("past_key_values", positional), ("kwargs", inspect.Parameter.VAR_KEYWORD)]:
        return (f"its {spec.cls_name}.forward takes ({', '.join(n for n, _ in params)}), not "
                f"(self, hidden_states, position_embeddings, attention_mask, past_key_values, "
                f"**kwargs)")
    cfg_cls = getattr(mod, spec.config_name, None)
    if cfg_cls is None:
        return f"it has no {spec.config_name}"
    try:
        cfg = cfg_cls(**{**_PROBE_CONFIG, **spec.probe_config})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            attn = cls(cfg, layer_idx=0)
    except Exception as e:  # noqa: BLE001 (any failure means: not the class we know)
        return f"a tiny {spec.cls_name} could not be built ({type(e).__name__}: {e})"
    missing = [a for a in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm",
                           "head_dim", "scaling", "attention_dropout", "layer_idx", "config")
               + (("sliding_window",) if spec.sliding_window else ()) if not hasattr(attn, a)]
    if missing:
        return f"its {spec.cls_name} has no {', '.join(missing)}"
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    d = attn.head_dim
    if spec.fuse_if is not None and not spec.fuse_if(attn):
        return f"the probe's {spec.cls_name} would not take the fused path"
    if type(attn.q_norm) is not type(attn.k_norm):
        return "its q_norm and k_norm are of different classes"
    for norm, h in ((attn.q_norm, heads), (attn.k_norm, kv_heads)):
        why = _probe_norm(norm, spec, h * d if spec.across_heads else d)
        if why:
            return why
    for norm in (attn.q_norm, attn.k_norm):
        setattr(norm, spec.eps_attr, 1e-6)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 1.0))
    batch, seq = 2, 5
    hidden = torch.randn(batch, seq, cfg.hidden_size, generator=g)
    angles = torch.rand(batch, seq, d // 2, generator=g) * 6.0
    emb = torch.cat((angles, angles), dim=-1)
    position_embeddings = (emb.cos(), emb.sin())
    mask = torch.zeros(batch, 1, seq, seq).masked_fill(
        torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))

    records = []
    real_eager = mod.eager_attention_forward
    me = threading.get_ident()

    def recorder(module, query, key, value, attention_mask, **kw):
        if module is attn and threading.get_ident() == me:
            records.append((query.detach().clone(), key.detach().clone(),
                            value.detach().clone(), attention_mask, dict(kw)))
        return real_eager(module, query, key, value, attention_mask, **kw)

    fused = _make_fused_forward(spec, mod, original, honour_hooks=False)
    mod.eager_attention_forward = recorder
    try:
        outs = []
        for training in (False, True):
            attn.train(training)
            with torch.no_grad():
                for fwd in (original, fused):
                    outs.append(fwd(attn, hidden, position_embeddings, mask))
    except Exception as e:  # noqa: BLE001
        return f"the probe forward failed ({type(e).__name__}: {e})"
    finally:
        mod.eager_attention_forward = real_eager
    if len(records) != 4:
        return (f"its {spec.cls_name}.forward does not call the module's attention function "
                f"once per call")
    for i in (0, 2):
        (qa, ka, va, ma, kwa), (qb, kb, vb, mb, kwb) = records[i], records[i + 1]
        if kwa != kwb:
            return (f"its {spec.cls_name}.forward passes the attention function the keyword "
                    f"arguments {kwa}, the fused forward {kwb}")
        if ma is not mb:
            return f"its {spec.cls_name}.forward changes the attention mask"
        for name, a, b in (("query", qa, qb), ("key", ka, kb), ("value", va, vb)):
            if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
                return (f"its {spec.cls_name}.forward gives the attention function a different "
                        f"{name} than q_norm/k_norm + RoPE as rope_ext computes them")
    (oa, _), (ob, _) = outs[0], outs[1]  # outputs; the attention weights are not compared
    if oa.shape != ob.shape or not torch.allclose(oa, ob, rtol=1e-4, atol=1e-5):
        return f"its {spec.cls_name}.forward returns a different output than the fused forward"
    return type(attn.q_norm).forward


def _check_fused(mod, spec: _FusedSpec) -> Optional[str]:
    name = _class_name(mod, spec)
    if name not in _fused_verified:
        _fused_verified[name], norm_forward = _probe_fused(mod, spec)
        if norm_forward is not None:
            _fused_norm_forwards[name] = norm_forward
    return _fused_verified[name]


def _patch_fused(mod, spec: _FusedSpec) -> Tuple[bool, Optional[str]]:
    """Replace spec.cls_name's forward (under _lock): (newly replaced, None), or (False, why
    not)."""
    cls = getattr(mod, spec.cls_name, None)
    current = cls.__dict__.get("forward") if isinstance(cls, type) else None
    if current is not None and _is_fused(current):
        return False, None
    if _fused_op() is None:
        return False, "this build of rope_ext has no rms_norm_rope_qk"
    reason = _check_fused(mod, spec)
    if reason is not None:
        return False, reason
    name = _class_name(mod, spec)
    _fused_originals[name] = (cls, current)
    cls.forward = _make_fused_forward(spec, mod, current)
    return True, None


def _unpatch_fused(names: Iterable[str]) -> List[str]:
    restored = []
    with _lock:
        for name in names:
            if name not in _fused_originals:
                continue
            cls, original = _fused_originals.pop(name)
            _fallbacks.pop(name, None)
            if _is_fused(cls.__dict__.get("forward")):  # only what is still ours
                cls.forward = original
                restored.append(name)
    return restored

