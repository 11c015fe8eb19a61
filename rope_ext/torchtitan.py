"""torchtitan's RoPE modules on rope_ext's op (written against torchtitan 0.3.0).

torchtitan picks a model's RoPE by config: every attention config has a ``rope`` field holding
a ``ComplexRoPE.Config`` (Llama 3 with its "llama" scaling, DeepSeek-V3 with "yarn": adjacent
pairs, a complex64 cache) or a ``CosSinRoPE.Config`` (Qwen3, gpt-oss: half-split pairs, a
``[cos | cos | sin | sin]`` float32 cache), and ``Attention.forward`` calls
``self.rope(q, k, positions)``. This module gives the same two modules on rope_ext:

- :class:`ComplexRoPE` and :class:`CosSinRoPE`: subclasses of torchtitan's, with the same
  ``Config`` fields, the same ``cache`` buffer (same name, shape, dtype and layout, so
  torchtitan code that reads ``rope.cache``, its sharding plans and its fused-MLA override
  keep working) holding exact values (angles in float64, rounded once), and a forward that
  rotates q and k in one op call, reading strided q/k (DeepSeek-V3's ``q_pe``/``k_pe`` slices)
  in place.
- :func:`complex_rope`, :func:`cos_sin_rope`: torchtitan ``@override`` factories, for
  ``--override.imports rope_ext.torchtitan.complex_rope,rope_ext.torchtitan.cos_sin_rope``
  (:data:`OVERRIDES`) on the trainer's command line or in ``config.override.imports``.
- :func:`convert`: the same replacement on a model config you build yourself.
- :func:`swap_modules`: the replacement in a model that is already built.
- :func:`patch` / :func:`unpatch` / :func:`patched`: every stock ``ComplexRoPE.Config`` and
  ``CosSinRoPE.Config`` (already made or made later) builds rope_ext's module.

Every way in first checks that torchtitan's RoPE code is the code these modules reproduce
(:func:`verify`: the syntax trees of its table, pairing and position functions, and the
config's fields), and refuses another torchtitan instead of computing something else.

Numerics: torchtitan forms its angles in float32 (``outer(t, freqs).float()``): its cos/sin
are off by up to 2.7e-3 over the Llama 3 debug model's 131072 positions (6e-4 over
DeepSeek-V3's 16384, 3e-4 over Qwen3's 4096); rope_ext's tables are within half a float32 ulp
at every position. Both rotate in float32 and round once to q's dtype. Like torchtitan's, the rotation is pure: YaRN's magnitude
correction (mscale) stays in the model's softmax scale.

Importing this module imports torchtitan.
"""

import ast
import contextlib
import dataclasses
import sys
from typing import Dict, Iterator, List, Optional, Tuple

import torch

import torchtitan.models.common.rope as _tt
from torchtitan.config.override import OverrideConfig, apply_overrides, derive, override

from rope_ext._source import function_key, matching_form, module_tree, source_key, \
    top_level_functions
from rope_ext.functional import apply_rope_qk
from rope_ext.tables import cos_sin_table, rope_frequencies

__all__ = ["ComplexRoPE", "CosSinRoPE", "complex_rope", "cos_sin_rope", "OVERRIDES", "convert",
           "swap_modules", "patch", "unpatch", "patched", "verify"]

# ---------------------------------------------------------------------------------------------
# The forms: torchtitan 0.3.0's code whose meaning the modules below reproduce
# (docstrings, comments, annotations and decorators do not count; rope_ext._source).

_FUNCTION_FORMS = {
    "_yarn_inv_freq": """
    def _yarn_inv_freq(dim, base, rope_factor, beta_fast, beta_slow, original_seq_len, truncate):
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))

        def find_correction_dim(num_rotations: float) -> float:
            return (dim * math.log(original_seq_len / (num_rotations * 2 * math.pi))) / (
                2 * math.log(base)
            )

        low = find_correction_dim(beta_fast)
        high = find_correction_dim(beta_slow)
        if truncate:
            low = math.floor(low)
            high = math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001

        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(
            0, 1
        )
        return inv_freq / rope_factor * ramp + inv_freq * (1 - ramp)
    """,
    "_reshape_for_broadcast": """
    def _reshape_for_broadcast(rope_cache, query_shape, positions=None):
        ndim = len(query_shape)
        assert ndim > 1
        bsz, seqlen = query_shape[:2]
        cache_width = rope_cache.shape[-1]
        if positions is None:
            rope_cache = rope_cache[0:seqlen]
            shape = [
                d if i == 1 else cache_width if i == ndim - 1 else 1
                for i, d in enumerate(query_shape)
            ]
            return rope_cache.view(*shape)
        if guard_or_false(positions.size(0) == 1):
            rope_cache = rope_cache[positions.squeeze(0)]
            shape = [
                d if i == 1 else cache_width if i == ndim - 1 else 1
                for i, d in enumerate(query_shape)
            ]
            return rope_cache.view(*shape)
        else:
            positions = positions.expand(bsz, -1)
            rope_cache_expanded = rope_cache[None, :, None, :].expand(bsz, -1, -1, -1)
            rope_cache = torch.gather(
                rope_cache_expanded,
                dim=1,
                index=positions.view(bsz, seqlen, 1, 1).expand(bsz, seqlen, 1, cache_width),
            )
            return rope_cache
    """,
}

_RESHAPE_CACHE_COMPLEX = """
    def _reshape_cache(self, query, positions=None):
        positions = _maybe_wrap_positions(positions, query)
        if positions is not None:
            _maybe_check_max_pos(positions, max_valid_pos=self.cache.shape[0] - 1)
        complex_query_shape = (*query.shape[:-1], query.shape[-1] // 2)
        return _reshape_for_broadcast(self.cache, complex_query_shape, positions)
"""
_RESHAPE_CACHE_COS_SIN = """
    def _reshape_cache(self, query, positions=None):
        positions = _maybe_wrap_positions(positions, query)
        if positions is not None:
            _maybe_check_max_pos(positions, max_valid_pos=self.cache.shape[0] - 1)
        return _reshape_for_broadcast(self.cache, query.shape, positions)
"""

_METHOD_FORMS = {
    ("RoPE", "forward"): """
    def forward(self, query, key, positions=None):
        reshaped_cache = self._reshape_cache(query, positions)
        return self.apply_rotary_emb(query, key, reshaped_cache)
    """,
    ("ComplexRoPE", "_precompute_cache"): """
    def _precompute_cache(self):
        cfg = self.config
        dim = cfg.dim
        end = cfg.max_seq_len
        theta = cfg.theta

        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))

        if cfg.scaling == "llama":
            scaling_factor = cfg.scaling_factor
            low_freq_factor = cfg.low_freq_factor
            high_freq_factor = cfg.high_freq_factor
            original_max_position_embeddings = cfg.original_max_position_embeddings
            wavelen = 2 * math.pi / freqs
            high_freq_wavelen = original_max_position_embeddings / high_freq_factor
            low_freq_wavelen = original_max_position_embeddings / low_freq_factor
            freqs = torch.where(
                wavelen > low_freq_wavelen, freqs / scaling_factor, freqs
            )
            smooth_factor = (
                original_max_position_embeddings / wavelen - low_freq_factor
            ) / (high_freq_factor - low_freq_factor)
            smoothed_freqs = (
                1 - smooth_factor
            ) * freqs / scaling_factor + smooth_factor * freqs
            is_medium_freqs = ~(wavelen < high_freq_wavelen) * ~(
                wavelen > low_freq_wavelen
            )
            freqs = torch.where(is_medium_freqs, smoothed_freqs, freqs)
        elif cfg.scaling == "yarn" and cfg.rope_factor > 1.0:
            freqs = _yarn_inv_freq(
                dim,
                theta,
                cfg.rope_factor,
                cfg.beta_fast,
                cfg.beta_slow,
                cfg.original_seq_len,
                cfg.truncate,
            )

        t = torch.arange(end, device=freqs.device)
        freqs = torch.outer(t, freqs).float()
        freqs_cis = torch.polar(torch.ones_like(freqs), freqs)
        return freqs_cis
    """,
    ("ComplexRoPE", "_reshape_cache"): _RESHAPE_CACHE_COMPLEX,
    ("ComplexRoPE", "apply_rotary_emb"): """
    def apply_rotary_emb(query, key, rope_cache):
        xq_ = torch.view_as_complex(query.float().reshape(*query.shape[:-1], -1, 2))
        xk_ = torch.view_as_complex(key.float().reshape(*key.shape[:-1], -1, 2))
        xq_out = torch.view_as_real(xq_ * rope_cache).flatten(3)
        xk_out = torch.view_as_real(xk_ * rope_cache).flatten(3)
        return xq_out.type_as(query), xk_out.type_as(key)
    """,
    ("CosSinRoPE", "_precompute_cache"): """
    def _precompute_cache(self):
        cfg = self.config
        dim = cfg.dim
        max_seq_len = cfg.max_seq_len
        base = cfg.theta

        if cfg.scaling == "llama":
            raise NotImplementedError("Cos/sin RoPE does not support Llama scaling.")

        if cfg.scaling == "yarn" and cfg.rope_factor > 1.0:
            inv_freq = _yarn_inv_freq(
                dim,
                base,
                cfg.rope_factor,
                cfg.beta_fast,
                cfg.beta_slow,
                cfg.original_seq_len,
                cfg.truncate,
            )
        else:
            inv_freq = 1.0 / (
                base ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim)
            )

        t = torch.arange(max_seq_len, dtype=inv_freq.dtype, device=inv_freq.device)
        freqs = torch.outer(t, inv_freq).float()
        theta = torch.cat([freqs, freqs], dim=-1)

        cos = theta.cos()
        sin = theta.sin()
        return torch.cat([cos, sin], dim=-1)
    """,
    ("CosSinRoPE", "_reshape_cache"): _RESHAPE_CACHE_COS_SIN,
    ("CosSinRoPE", "apply_rotary_emb"): """
    def apply_rotary_emb(query, key, rope_cache):
        head_dim = query.shape[-1]
        cos = rope_cache[..., :head_dim]
        sin = rope_cache[..., head_dim:]
        query_f = query.float()
        key_f = key.float()
        xq_out = (query_f * cos) + (CosSinRoPE._rotate_half(query_f) * sin)
        xk_out = (key_f * cos) + (CosSinRoPE._rotate_half(key_f) * sin)
        return xq_out.type_as(query), xk_out.type_as(key)
    """,
    ("CosSinRoPE", "_rotate_half"): """
    def _rotate_half(x):
        x1 = x[..., : x.shape[-1] // 2]
        x2 = x[..., x.shape[-1] // 2 :]
        return torch.cat((-x2, x1), dim=-1)
    """,
}

# RoPE.Config's own fields (Module.Config's param_init and sharding_config aside): a field
# torchtitan adds later would change the meaning of a config these modules would ignore.
_CONFIG_FIELDS = frozenset({
    "dim", "max_seq_len", "theta", "scaling", "scaling_factor", "low_freq_factor",
    "high_freq_factor", "original_max_position_embeddings", "rope_factor", "beta_fast",
    "beta_slow", "original_seq_len", "truncate", "param_init", "sharding_config"})

_verified: Optional[Dict[str, str]] = None


def verify() -> Dict[str, str]:
    """Compare torchtitan's RoPE code with the forms rope_ext reproduces.

    Returns:
        ``{what: problem}`` for every function, method or config field of
        ``torchtitan.models.common.rope`` that differs from torchtitan 0.3.0's; empty when
        the installed torchtitan is one whose RoPE :class:`ComplexRoPE` and :class:`CosSinRoPE`
        reproduce. The answer is computed once per process.
    """
    global _verified
    if _verified is not None:
        return dict(_verified)
    problems: Dict[str, str] = {}
    try:
        tree = module_tree(_tt)
    except (OSError, TypeError, SyntaxError) as e:  # e.g. a bytecode-only install
        _verified = {_tt.__name__: f"its source cannot be read ({e})"}
        return dict(_verified)
    functions = top_level_functions(tree)
    for name, src in _FUNCTION_FORMS.items():
        if matching_form(functions.get(name), {name: source_key(src)}) is None:
            problems[name] = "missing" if name not in functions else "its code differs"
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    for (cls_name, meth), src in _METHOD_FORMS.items():
        fn = _method(classes.get(cls_name), meth)
        if fn is None:
            problems[f"{cls_name}.{meth}"] = "missing"
        elif function_key(fn) != source_key(src):
            problems[f"{cls_name}.{meth}"] = "its code differs"
    fields = {f.name for f in dataclasses.fields(_tt.RoPE.Config)}
    if fields != _CONFIG_FIELDS:
        extra, missing = sorted(fields - _CONFIG_FIELDS), sorted(_CONFIG_FIELDS - fields)
        problems["RoPE.Config"] = f"fields differ (new: {extra}, gone: {missing})"
    _verified = problems
    return dict(problems)


def _method(cls_node, name: str):
    """The method ``name`` defined in the class body ``cls_node`` (an ast.ClassDef), or None."""
    if cls_node is None:
        return None
    found = [n for n in cls_node.body if isinstance(n, ast.FunctionDef) and n.name == name]
    return found[-1] if found else None


def _require_verified() -> None:
    problems = verify()
    if problems:
        version = getattr(sys.modules.get("torchtitan"), "__version__", "unknown")
        details = "; ".join(f"{k}: {v}" for k, v in sorted(problems.items()))
        raise RuntimeError(
            f"rope_ext.torchtitan reproduces torchtitan 0.3.0's RoPE, but this torchtitan "
            f"({version}) differs: {details}. Its RoPE is left as it is; use torchtitan's own "
            f"modules, or rope_ext.apply_rope_qk in your attention.")


# ---------------------------------------------------------------------------------------------
# The tables


def _inv_freq(cfg, cos_sin: bool) -> torch.Tensor:
    """The float64 inverse frequencies torchtitan's config means (on the CPU)."""
    if cfg.scaling == "llama":
        if cos_sin:  # as torchtitan's CosSinRoPE: its cache has no Llama scaling
            raise NotImplementedError("Cos/sin RoPE does not support Llama scaling.")
        inv_freq, _ = rope_frequencies(cfg.dim, float(cfg.theta), {
            "rope_type": "llama3", "factor": cfg.scaling_factor,
            "low_freq_factor": cfg.low_freq_factor, "high_freq_factor": cfg.high_freq_factor,
            "original_max_position_embeddings": cfg.original_max_position_embeddings})
        return inv_freq
    if cfg.scaling == "yarn" and cfg.rope_factor > 1.0:
        # The attention factor rope_frequencies also returns (YaRN's mscale) is not used:
        # torchtitan's rope is a pure rotation, its model folds mscale into the softmax scale.
        inv_freq, _ = rope_frequencies(cfg.dim, float(cfg.theta), {
            "rope_type": "yarn", "factor": cfg.rope_factor,
            "original_max_position_embeddings": cfg.original_seq_len,
            "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow,
            "truncate": bool(cfg.truncate)})
        return inv_freq
    if cfg.scaling not in ("none", "yarn"):
        raise ValueError(f"RoPE.Config.scaling must be 'none', 'llama' or 'yarn', got "
                         f"{cfg.scaling!r}")
    inv_freq, _ = rope_frequencies(cfg.dim, float(cfg.theta))
    return inv_freq


def _tables(cfg, cos_sin: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact float32 cos/sin ``[max_seq_len, dim/2]`` on the default device.

    torchtitan builds its model under ``torch.device("meta")`` and rebuilds the caches under
    ``torch.device(buffer_device)`` (init_states): the tables follow the default device as
    torchtitan's do, but are computed on the CPU in float64 wherever they end up, so every
    device gets the same table.
    """
    if cfg.dim <= 0 or cfg.dim % 2:
        raise ValueError(f"RoPE.Config.dim must be a positive even number, got {cfg.dim}")
    device = torch.empty(0).device
    with torch.device("cpu"):
        inv_freq = _inv_freq(cfg, cos_sin)  # also on the meta device: a bad config raises
        if device.type == "meta":  # shapes only
            shape = (cfg.max_seq_len, cfg.dim // 2)
            return torch.empty(shape, device=device), torch.empty(shape, device=device)
        cos, sin = cos_sin_table(inv_freq, cfg.max_seq_len)
    return cos.to(device), sin.to(device)


# ---------------------------------------------------------------------------------------------
# The modules


def _check_head_dims(query: torch.Tensor, key: torch.Tensor, pairs: int) -> None:
    # torchtitan's rotation spans the whole head (its cache broadcast fails otherwise); the op
    # would rotate the first 2 * pairs dims and pass the rest through, so refuse instead.
    if query.shape[-1] != 2 * pairs or key.shape[-1] != 2 * pairs:
        raise ValueError(f"query and key must have head_dim = RoPE.Config.dim = {2 * pairs}, "
                         f"got {query.shape[-1]} and {key.shape[-1]}")


class _RopeExtForward:
    """The forward shared by both modules: torchtitan's position handling, rope_ext's rotation."""

    _interleaved = False

    def _cos_sin(self) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, query: torch.Tensor, key: torch.Tensor,
                positions: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rotate query and key, ``[batch, seq, heads, head_dim]`` (any strides).

        positions: None (token s at position s), or ``[1, seq]`` / ``[batch, seq]`` integer
        positions (per-document positions of a packed batch), as torchtitan passes them.
        Returns the rotated ``(query, key)`` in their dtypes.
        """
        positions = _tt._maybe_wrap_positions(positions, query)
        if positions is not None:
            # torchtitan's asynchronous bounds check, so a bad position fails as it does there
            # (the op itself raises on the CPU but gives NaN on CUDA, where checking would sync).
            _tt._maybe_check_max_pos(positions, max_valid_pos=self.cache.shape[0] - 1)
        cos, sin = self._cos_sin()
        _check_head_dims(query, key, cos.shape[-1])
        return apply_rope_qk(query, key, cos, sin, positions, interleaved=self._interleaved)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        cache = self._buffers.get("cache")
        if (cache is not None and type(cache) is torch.Tensor and not cache.is_complex()
                and cache.dtype != torch.float32 and cache.device.type != "meta"):
            # A dtype cast (model.to(torch.bfloat16)) reached the table: rebuild it exact, in
            # float32, where it now lives (the op reads float32 tables beside any q dtype).
            with torch.device(cache.device):
                self.cache = self._precompute_cache()
        return self


class ComplexRoPE(_RopeExtForward, _tt.ComplexRoPE):
    """torchtitan's ``ComplexRoPE`` (adjacent pairs: Llama 3, DeepSeek-V3) on rope_ext's op.

    Same ``Config`` (dim, max_seq_len, theta, scaling "none" / "llama" / "yarn" and their
    parameters), same ``cache`` buffer: complex64 ``[max_seq_len, dim/2]`` holding
    ``cos + i sin`` of each angle, here computed in float64 and rounded once. ``forward(query,
    key, positions=None)`` rotates both in one op call.
    """

    _interleaved = True

    @dataclasses.dataclass(kw_only=True, slots=True)
    class Config(_tt.ComplexRoPE.Config):
        """torchtitan's ComplexRoPE.Config; builds :class:`rope_ext.torchtitan.ComplexRoPE`."""

    def _precompute_cache(self) -> torch.Tensor:
        """The complex64 cache ``[max_seq_len, dim/2]``, exact (torchtitan's format)."""
        cos, sin = _tables(self.config, cos_sin=False)
        return torch.complex(cos, sin)

    def _cos_sin(self) -> Tuple[torch.Tensor, torch.Tensor]:
        # Real and imaginary parts of the complex cache: strided views, no copy.
        pairs = torch.view_as_real(self.cache)
        return pairs[..., 0], pairs[..., 1]


class CosSinRoPE(_RopeExtForward, _tt.CosSinRoPE):
    """torchtitan's ``CosSinRoPE`` (half-split pairs: Qwen3, gpt-oss) on rope_ext's op.

    Same ``Config``, same ``cache`` buffer: float32 ``[max_seq_len, 2 * dim]`` laid out
    ``[cos | cos | sin | sin]`` (each half of the head reads its copy), here computed in float64
    and rounded once. ``forward(query, key, positions=None)`` rotates both in one op call.
    """

    _interleaved = False

    @dataclasses.dataclass(kw_only=True, slots=True)
    class Config(_tt.CosSinRoPE.Config):
        """torchtitan's CosSinRoPE.Config; builds :class:`rope_ext.torchtitan.CosSinRoPE`."""

    def _precompute_cache(self) -> torch.Tensor:
        """The float32 cache ``[max_seq_len, 2 * dim]``, ``[cos | cos | sin | sin]``, exact."""
        cos, sin = _tables(self.config, cos_sin=True)
        return torch.cat([cos, cos, sin, sin], dim=-1)

    def _cos_sin(self) -> Tuple[torch.Tensor, torch.Tensor]:
        # The first copy of cos and of sin: row-strided views, no copy.
        cache = self.cache
        half = cache.shape[-1] // 4
        return cache[:, :half], cache[:, 2 * half:3 * half]


_REPLACEMENTS = ((_tt.ComplexRoPE, ComplexRoPE), (_tt.CosSinRoPE, CosSinRoPE))


# ---------------------------------------------------------------------------------------------
# Ways in: torchtitan's overrides, a config tree, a built model, and patch()


def _register_override(target, description):
    def decorator(fn):
        from torchtitan.config.override import _REGISTRY

        if f"{fn.__module__}.{fn.__name__}" in _REGISTRY:  # a re-import of this module
            return fn
        return override(target=target, exact=True, description=description)(fn)
    return decorator


@_register_override(_tt.ComplexRoPE.Config, "rope_ext: exact complex RoPE, one op call")
def complex_rope(cfg: _tt.ComplexRoPE.Config) -> ComplexRoPE.Config:
    """torchtitan override factory: a stock ``ComplexRoPE.Config`` -> rope_ext's (same fields).

    Activate with ``--override.imports rope_ext.torchtitan.complex_rope``. Raises RuntimeError
    when the installed torchtitan's RoPE code is not the one rope_ext reproduces.
    """
    _require_verified()
    return derive(cfg, ComplexRoPE.Config)


@_register_override(_tt.CosSinRoPE.Config, "rope_ext: exact cos/sin RoPE, one op call")
def cos_sin_rope(cfg: _tt.CosSinRoPE.Config) -> CosSinRoPE.Config:
    """torchtitan override factory: a stock ``CosSinRoPE.Config`` -> rope_ext's (same fields).

    Activate with ``--override.imports rope_ext.torchtitan.cos_sin_rope``. Raises RuntimeError
    when the installed torchtitan's RoPE code is not the one rope_ext reproduces.
    """
    _require_verified()
    return derive(cfg, CosSinRoPE.Config)


#: Both overrides, as ``config.override.imports`` takes them.
OVERRIDES = ["rope_ext.torchtitan.complex_rope", "rope_ext.torchtitan.cos_sin_rope"]


def convert(model_config) -> List[str]:
    """Replace, in place, every stock RoPE config of a torchtitan model config with rope_ext's.

    For a model you build yourself (``config.build()``) rather than through the Trainer,
    which applies :data:`OVERRIDES` itself when they are in ``config.override.imports``.
    Runs torchtitan's own override machinery (the same matching and replacement).

    Returns:
        torchtitan's log lines, one per replaced config (``"[Override] ...: layers.0.attention.
        rope ComplexRoPE.Config -> ComplexRoPE.Config"``).
    """
    return apply_overrides(OverrideConfig(imports=list(OVERRIDES)), model_config)


def swap_modules(model: torch.nn.Module) -> List[str]:
    """Replace, in place, every stock torchtitan RoPE module of a built model with rope_ext's.

    A module shared by several attentions stays shared. The new module is built from the old
    one's config on the device of its cache; it has no parameters and no persistent buffers,
    so the state dict is unchanged. Swap before parallelizing: a cache that is already a
    DTensor raises ValueError (use :data:`OVERRIDES` or :func:`convert` before the build).

    Returns:
        The names of the replaced modules.
    """
    _require_verified()
    replaced: List[str] = []
    built: Dict[int, torch.nn.Module] = {}
    for name, parent in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(parent._modules.items()):
            ours = next((o for stock, o in _REPLACEMENTS if type(child) is stock), None)
            if ours is None:
                continue
            if id(child) not in built:
                cache = child.cache
                if type(cache) is not torch.Tensor:
                    raise ValueError(f"{name}.{child_name}'s cache is a {type(cache).__name__}: "
                                     f"swap RoPE modules before parallelizing the model")
                with torch.device(cache.device):
                    new = ours(dataclasses.replace(child.config))
                new._param_init = child._param_init
                new._sharding_config = child._sharding_config
                new.train(child.training)
                built[id(child)] = new
            setattr(parent, child_name, built[id(child)])
            replaced.append(f"{name}.{child_name}" if name else child_name)
    return replaced


_patched: Dict[type, type] = {}  # stock Config class -> its _owner before patch()


def patch() -> List[str]:
    """Make every stock ``ComplexRoPE.Config`` / ``CosSinRoPE.Config`` build rope_ext's module.

    Configs already made and configs made later alike (``config.build()`` constructs the
    Config's owner class, which this swaps). :func:`unpatch` undoes it. Raises RuntimeError
    when the installed torchtitan's RoPE code is not the one rope_ext reproduces.

    Returns:
        The names of the patched config classes.
    """
    _require_verified()
    names = []
    for stock, ours in _REPLACEMENTS:
        if stock.Config not in _patched:
            _patched[stock.Config] = stock.Config._owner
        stock.Config._owner = ours
        names.append(f"{stock.__module__}.{stock.__qualname__}.Config")
    return names


def unpatch() -> None:
    """Undo :func:`patch`: stock configs build torchtitan's own modules again."""
    while _patched:
        config_cls, owner = _patched.popitem()
        config_cls._owner = owner


@contextlib.contextmanager
def patched() -> Iterator[List[str]]:
    """:func:`patch` for the duration of a ``with`` block; yields what was patched."""
    names = patch()
    try:
        yield names
    finally:
        unpatch()
