"""torchtune's RoPE modules on rope_ext's op (written against torchtune 0.6.1).

Four drop-ins, each with the constructor arguments, attributes, buffers and forward of the
torchtune module of the same name:

=====================================  ======================================  ==============
rope_ext.torchtune                     replaces (torchtune)                    pairs
=====================================  ======================================  ==============
RotaryPositionalEmbeddings             torchtune.modules (Llama 2/3, Mistral,  adjacent
                                       Gemma, ...)
Llama3ScaledRoPE                       torchtune.models.llama3_1 (3.1 - 3.3)   adjacent
Phi3RotaryPositionalEmbeddings         torchtune.models.phi3 (Phi-3, Phi-4)    half-split
Qwen2RotaryPositionalEmbeddings        torchtune.models.qwen2 (Qwen2, 2.5)     half-split
=====================================  ======================================  ==============

``forward(x, input_pos=None)``: x ``[b, s, n_h, h_d]`` (any strides), input_pos None (token s
at position s), ``[b, s]`` (packed samples: each token's position within its own sample, or
the positions of a KV-cache step) or ``[s]``; the result has x's shape and dtype.

The buffers keep torchtune's meaning: ``theta`` (float32 ``[dim/2]``, non-persistent) and
``cache`` (non-persistent, torchtune's layout: ``[max_seq_len, dim/2, 2]`` of (cos, sin) for
the adjacent-pair modules, ``[max_seq_len, 2 * dim]`` = ``[cos | cos | sin | sin]`` for Phi-3
and Qwen2), rebuilt by ``rope_init()`` / ``build_rope_cache(max_seq_len)`` on the default
device as torchtune's are (its recipes build the model on the meta device, then call
``rope_init()`` under the real one). Differences, all deliberate:

- the table's angles are computed in float64 and rounded once (torchtune forms them in
  float32, off by up to ~8 ulps of ``m * theta_i`` at position m), so are ``theta``'s values;
- the rotation is one op call in float32 with one rounding to x's dtype (Qwen2's module
  rounds cos/sin to x's dtype and computes in it);
- a dtype cast of the module (``model.to(torch.bfloat16)``) rebuilds the float32 table
  instead of rounding it.

:func:`swap_modules` replaces every such torchtune module of a built model in place, after
checking that its code is the one these modules reproduce (:func:`verify`). Nothing here
imports torchtune: torchtune's modules are recognized by their class's module and name.
"""

import ast
import sys
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from rope_ext._source import function_key, module_tree, source_key
from rope_ext.functional import apply_rope
from rope_ext.tables import cos_sin_table, rope_frequencies

__all__ = ["RotaryPositionalEmbeddings", "Llama3ScaledRoPE", "Phi3RotaryPositionalEmbeddings",
           "Qwen2RotaryPositionalEmbeddings", "swap_modules", "verify", "REPLACES"]


def _table(inv_freq: torch.Tensor, rows: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact float32 cos/sin ``[rows, dim/2]`` on `device`: float64 math on the CPU, so every
    device gets the same table; shapes only on the meta device."""
    if torch.device(device).type == "meta":
        shape = (rows, inv_freq.shape[0])
        return torch.empty(shape, device="meta"), torch.empty(shape, device="meta")
    cos, sin = cos_sin_table(inv_freq, rows, device=torch.device("cpu"))
    return cos.to(device), sin.to(device)


def _default_device() -> torch.device:
    """The device factory functions use now (``with torch.device(...)`` included), where
    torchtune's rope_init creates its buffers."""
    return torch.empty(0).device


class _TorchtuneRoPE(nn.Module):
    """What the four modules share: the exact buffers and the op call."""

    _interleaved = True  # adjacent pairs (x[2i], x[2i+1]); False: halves (x[i], x[i + d/2])

    def _frequencies(self) -> torch.Tensor:
        """float64 CPU inverse frequencies ``[dim/2]``."""
        inv_freq, _ = rope_frequencies(self.dim, float(self.base))
        return inv_freq

    def rope_init(self) -> None:
        """(Re)build ``theta`` and ``cache`` on the default device, as torchtune's does."""
        with torch.device("cpu"):
            self._inv_freq = self._frequencies()
        device = _default_device()
        theta = torch.empty(self._inv_freq.shape, device="meta") if device.type == "meta" \
            else self._inv_freq.float().to(device)
        self.register_buffer("theta", theta, persistent=False)
        self.build_rope_cache(self.max_seq_len)

    def build_rope_cache(self, max_seq_len: int = 4096) -> None:
        """(Re)build ``cache`` for positions ``0 .. max_seq_len - 1`` on ``theta``'s device."""
        cos, sin = _table(self._inv_freq, max_seq_len, self.theta.device)
        self.register_buffer("cache", self._pack(cos, sin), persistent=False)

    def _pack(self, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The cache in torchtune's layout for this module."""
        return torch.stack([cos, sin], dim=-1)

    def _cos_sin(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[P, dim/2]`` as views of the cache (strided: the op reads them in place)."""
        cache = self.cache
        return cache[..., 0], cache[..., 1]

    def _rotate(self, x: torch.Tensor, input_pos: Optional[torch.Tensor]) -> torch.Tensor:
        if x.dim() == 4 and x.shape[-1] != self.dim:
            # torchtune rotates the whole head (its cache view fails otherwise); the op would
            # rotate the first dim features and pass the rest through, so refuse instead.
            raise ValueError(f"x must have head_dim = dim = {self.dim} (x is [b, s, n_h, h_d]), "
                             f"got shape {tuple(x.shape)}")
        cos, sin = self._cos_sin()
        return apply_rope(x, cos, sin, input_pos, interleaved=self._interleaved)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        cache = self._buffers.get("cache")
        if cache is not None and cache.dtype != torch.float32 and cache.device.type != "meta":
            # A dtype cast reached the table: rebuild it exact, in float32 (the op reads a
            # float32 table beside x of any dtype), and theta with it.
            self.register_buffer("theta", self._inv_freq.float().to(cache.device),
                                 persistent=False)
            self.build_rope_cache(cache.shape[0])
        return self

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_seq_len={self.max_seq_len}, base={self.base}"


class RotaryPositionalEmbeddings(_TorchtuneRoPE):
    """``torchtune.modules.RotaryPositionalEmbeddings`` on rope_ext: adjacent pairs.

    Args:
        dim: the head dimension (``embed_dim // num_heads``), all of it rotated.
        max_seq_len: rows of the cache (positions ``0 .. max_seq_len - 1``).
        base: the geometric progression's base (rope_theta).
    """

    def __init__(self, dim: int, max_seq_len: int = 4096, base: int = 10_000) -> None:
        super().__init__()
        self.dim = dim
        self.base = base
        self.max_seq_len = max_seq_len
        self.rope_init()

    def forward(self, x: torch.Tensor, *, input_pos: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """Rotate x ``[b, s, n_h, h_d]``; input_pos ``[b, s]`` / ``[s]`` or None (0 .. s-1)."""
        return self._rotate(x, input_pos)


class Llama3ScaledRoPE(_TorchtuneRoPE):
    """``torchtune.models.llama3_1.Llama3ScaledRoPE`` on rope_ext: Llama 3.1 frequency scaling,
    adjacent pairs.

    Args:
        dim, max_seq_len, base: as :class:`RotaryPositionalEmbeddings`.
        scale_factor, low_freq_factor, high_freq_factor, old_context_len: Llama 3.1's scaling
            (transformers' factor, low_freq_factor, high_freq_factor and
            original_max_position_embeddings).

    As torchtune's, on the meta device ``rope_init()`` builds nothing (``is_cache_built`` stays
    False and forward raises RuntimeError) until it is called again on a real device.
    """

    def __init__(self, dim: int, max_seq_len: int = 4096, base: int = 10_000,
                 scale_factor: int = 8, low_freq_factor: int = 1, high_freq_factor: int = 4,
                 old_context_len: int = 8192) -> None:
        super().__init__()
        self.dim = dim
        self.base = base
        self.max_seq_len = max_seq_len
        self.scale_factor = scale_factor
        self.low_freq_factor = low_freq_factor
        self.high_freq_factor = high_freq_factor
        self.old_context_len = old_context_len
        self.is_cache_built = False
        self.rope_init()

    def _frequencies(self) -> torch.Tensor:
        inv_freq, _ = rope_frequencies(self.dim, float(self.base), {
            "rope_type": "llama3", "factor": self.scale_factor,
            "low_freq_factor": self.low_freq_factor, "high_freq_factor": self.high_freq_factor,
            "original_max_position_embeddings": self.old_context_len})
        return inv_freq

    def rope_init(self) -> None:
        """Build ``theta`` and ``cache`` on the default device; on the meta device, nothing."""
        if _default_device().type == "meta":
            return
        super().rope_init()
        self.is_cache_built = True

    def forward(self, x: torch.Tensor, *, input_pos: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """Rotate x ``[b, s, n_h, h_d]``; input_pos ``[b, s]`` / ``[s]`` or None (0 .. s-1).

        Raises:
            RuntimeError: the cache was never built (the module was made on the meta device
                and ``rope_init()`` was not called since).
        """
        if not self.is_cache_built:
            raise RuntimeError("RoPE cache is not built. Please call rope_init() first.")
        return self._rotate(x, input_pos)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, scale_factor={self.scale_factor}, "
                f"low_freq_factor={self.low_freq_factor}, high_freq_factor="
                f"{self.high_freq_factor}, old_context_len={self.old_context_len}")


class _HalfSplitRoPE(_TorchtuneRoPE):
    """Phi-3's and Qwen2's layout: pairs (x[i], x[i + d/2]), cache ``[cos | cos | sin | sin]``."""

    _interleaved = False

    def _pack(self, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return torch.cat([cos, cos, sin, sin], dim=-1)

    def _cos_sin(self) -> Tuple[torch.Tensor, torch.Tensor]:
        cache, half = self.cache, self.dim // 2
        return cache[:, :half], cache[:, self.dim:self.dim + half]


class Phi3RotaryPositionalEmbeddings(_HalfSplitRoPE):
    """``torchtune.models.phi3.Phi3RotaryPositionalEmbeddings`` on rope_ext: half-split pairs.

    Args:
        dim, max_seq_len, base: as :class:`RotaryPositionalEmbeddings`.
    """

    def __init__(self, dim: int, max_seq_len: int = 4096, base: int = 10_000) -> None:
        super().__init__()
        self.dim = dim
        self.base = base
        self.max_seq_len = max_seq_len
        self.rope_init()

    def forward(self, x: torch.Tensor, input_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rotate x ``[b, s, n_h, h_d]``; input_pos ``[b, s]`` / ``[s]`` or None (0 .. s-1)."""
        return self._rotate(x, input_pos)


class Qwen2RotaryPositionalEmbeddings(_HalfSplitRoPE):
    """``torchtune.models.qwen2.Qwen2RotaryPositionalEmbeddings`` on rope_ext: half-split pairs.

    Args:
        dim, max_seq_len: as :class:`RotaryPositionalEmbeddings`.
        base: rope_theta (Qwen2's default 1e6).
    """

    def __init__(self, dim: int, max_seq_len: int = 4096, base: float = 1_000_000.0) -> None:
        super().__init__()
        self.dim = dim
        self.base = base
        self.max_seq_len = max_seq_len
        self.rope_init()

    def forward(self, x: torch.Tensor, input_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rotate x ``[b, s, n_h, h_d]``; input_pos ``[b, s]`` / ``[s]`` or None (0 .. s-1)."""
        return self._rotate(x, input_pos)


# ---------------------------------------------------------------------------------------------
# The forms: torchtune 0.6.1's code whose meaning the modules above reproduce (docstrings,
# comments and annotations do not count; rope_ext._source).

_INIT = """
    def __init__(self, dim, max_seq_len=4096, base=10_000):
        super().__init__()
        self.dim = dim
        self.base = base
        self.max_seq_len = max_seq_len
        self.rope_init()
"""
_INIT_QWEN2 = _INIT.replace("base=10_000", "base=1_000_000.0")
_ROPE_INIT = """
    def rope_init(self):
        theta = 1.0 / (
            self.base
            ** (torch.arange(0, self.dim, 2)[: (self.dim // 2)].float() / self.dim)
        )
        self.register_buffer("theta", theta, persistent=False)
        self.build_rope_cache(self.max_seq_len)
"""
_CACHE_HEAD = """
    def build_rope_cache(self, max_seq_len=4096):
        seq_idx = torch.arange(
            max_seq_len, dtype=self.theta.dtype, device=self.theta.device
        )
        idx_theta = torch.einsum("i, j -> ij", seq_idx, self.theta).float()
"""
_CACHE_STACKED = _CACHE_HEAD + """
        cache = torch.stack([torch.cos(idx_theta), torch.sin(idx_theta)], dim=-1)
        self.register_buffer("cache", cache, persistent=False)
"""
_CACHE_HALVES = _CACHE_HEAD + """
        freqs = torch.cat([idx_theta, idx_theta], dim=-1)
        cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
        self.register_buffer("cache", cache, persistent=False)
"""
_ADJACENT_BODY = """
        seq_len = x.size(1)
        rope_cache = (
            self.cache[:seq_len] if input_pos is None else self.cache[input_pos]
        )
        xshaped = x.float().reshape(*x.shape[:-1], -1, 2)
        rope_cache = rope_cache.view(-1, xshaped.size(1), 1, xshaped.size(3), 2)
        x_out = torch.stack(
            [
                xshaped[..., 0] * rope_cache[..., 0]
                - xshaped[..., 1] * rope_cache[..., 1],
                xshaped[..., 1] * rope_cache[..., 0]
                + xshaped[..., 0] * rope_cache[..., 1],
            ],
            -1,
        )
        x_out = x_out.flatten(3)
        return x_out.type_as(x)
"""
_FORWARD_ADJACENT = """
    def forward(self, x, *, input_pos=None):""" + _ADJACENT_BODY
_FORWARD_LLAMA3 = """
    def forward(self, x, *, input_pos=None):
        if not self.is_cache_built:
            raise RuntimeError(
                "RoPE cache is not built. Please call rope_init() first."
            )""" + _ADJACENT_BODY
_FORWARD_HALVES = """
    def forward(self, x, input_pos=None):
        seq_len = x.size(1)
        head_dim = x.size(-1)
        rope_cache = (
            self.cache[:seq_len] if input_pos is None else self.cache[input_pos]
        )
        rope_cache = rope_cache.view(-1, seq_len, 1, head_dim * 2)
        cos = rope_cache[..., :head_dim]{cast}
        sin = rope_cache[..., head_dim:]{cast}
        x1 = x[..., : x.shape[-1] // 2]
        x2 = x[..., x.shape[-1] // 2 :]
        rotated = torch.cat((-x2, x1), dim=-1)
        x_out = (x * cos) + (rotated * sin)
        return x_out.type_as(x)
"""
_LLAMA3_INIT = """
    def __init__(self, dim, max_seq_len=4096, base=10_000, scale_factor=8, low_freq_factor=1,
                 high_freq_factor=4, old_context_len=8192):
        super().__init__()
        self.dim = dim
        self.base = base
        self.max_seq_len = max_seq_len

        self.scale_factor = scale_factor
        self.low_freq_factor = low_freq_factor
        self.high_freq_factor = high_freq_factor
        self.old_context_len = old_context_len
        self.is_cache_built = False
        self.rope_init()
"""
_LLAMA3_ROPE_INIT = """
    def rope_init(self):
        freqs = 1.0 / (
            self.base
            ** (torch.arange(0, self.dim, 2)[: (self.dim // 2)].float() / self.dim)
        )
        if freqs.is_meta:
            return

        theta = self.apply_scaling(
            freqs,
            self.scale_factor,
            self.low_freq_factor,
            self.high_freq_factor,
            self.old_context_len,
        )
        self.register_buffer("theta", theta, persistent=False)
        self.build_rope_cache(self.max_seq_len)
        self.is_cache_built = True
"""
_LLAMA3_APPLY_SCALING = """
    def apply_scaling(self, freqs, scale_factor, low_freq_factor, high_freq_factor,
                      old_context_len):
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        new_freqs = []
        for freq in freqs:
            wavelen = 2 * math.pi / freq
            if wavelen < high_freq_wavelen:
                new_freqs.append(freq)
            elif wavelen > low_freq_wavelen:
                new_freqs.append(freq / scale_factor)
            else:
                assert low_freq_wavelen != high_freq_wavelen
                smooth = (old_context_len / wavelen - low_freq_factor) / (
                    high_freq_factor - low_freq_factor
                )
                new_freqs.append((1 - smooth) * freq / scale_factor + smooth * freq)
        return torch.tensor(new_freqs, dtype=freqs.dtype, device=freqs.device)
"""

# "module.Class" of torchtune -> (rope_ext's replacement, {method: form})
REPLACES: Dict[str, Tuple[type, Dict[str, str]]] = {
    "torchtune.modules.position_embeddings.RotaryPositionalEmbeddings": (
        RotaryPositionalEmbeddings,
        {"__init__": _INIT, "rope_init": _ROPE_INIT, "build_rope_cache": _CACHE_STACKED,
         "forward": _FORWARD_ADJACENT}),
    "torchtune.models.llama3_1._position_embeddings.Llama3ScaledRoPE": (
        Llama3ScaledRoPE,
        {"__init__": _LLAMA3_INIT, "rope_init": _LLAMA3_ROPE_INIT,
         "build_rope_cache": _CACHE_STACKED, "apply_scaling": _LLAMA3_APPLY_SCALING,
         "forward": _FORWARD_LLAMA3}),
    "torchtune.models.phi3._position_embeddings.Phi3RotaryPositionalEmbeddings": (
        Phi3RotaryPositionalEmbeddings,
        {"__init__": _INIT, "rope_init": _ROPE_INIT, "build_rope_cache": _CACHE_HALVES,
         "forward": _FORWARD_HALVES.format(cast="")}),
    "torchtune.models.qwen2._positional_embeddings.Qwen2RotaryPositionalEmbeddings": (
        Qwen2RotaryPositionalEmbeddings,
        {"__init__": _INIT_QWEN2, "rope_init": _ROPE_INIT, "build_rope_cache": _CACHE_HALVES,
         "forward": _FORWARD_HALVES.format(cast=".to(x.dtype)")}),
}

_verified: Dict[type, Dict[str, str]] = {}


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def verify(cls: type) -> Dict[str, str]:
    """Compare a torchtune RoPE class's code with the form rope_ext reproduces.

    Args:
        cls: one of torchtune's four RoPE classes (the keys of :data:`REPLACES`).

    Returns:
        ``{method: problem}`` for each method whose code differs from torchtune 0.6.1's (or
        that is missing, or whose class defines methods the form does not know); empty when
        :func:`swap_modules` may replace its instances. Computed once per class.
    """
    if cls in _verified:
        return dict(_verified[cls])
    name = _class_name(cls)
    if name not in REPLACES:
        raise ValueError(f"{name} is not a torchtune RoPE class rope_ext replaces; expected one "
                         f"of {sorted(REPLACES)}")
    forms = REPLACES[name][1]
    try:
        tree = module_tree(sys.modules[cls.__module__])
    except (KeyError, OSError, TypeError, SyntaxError) as e:
        problems = {name: f"its source cannot be read ({e})"}
    else:
        node = next((n for n in tree.body if isinstance(n, ast.ClassDef)
                     and n.name == cls.__qualname__), None)
        methods = {} if node is None else {
            n.name: n for n in node.body if isinstance(n, ast.FunctionDef)}
        problems = {}
        for meth, form in forms.items():
            if meth not in methods:
                problems[meth] = "missing"
            elif function_key(methods[meth]) != source_key(form):
                problems[meth] = "its code differs"
        for meth in sorted(set(methods) - set(forms)):
            problems[meth] = "a method rope_ext does not know"
        if list(cls.__bases__) != [nn.Module]:
            problems["bases"] = f"{[_class_name(b) for b in cls.__bases__]}, not [nn.Module]"
    _verified[cls] = problems
    return dict(problems)


def _replacement(module: nn.Module) -> nn.Module:
    """rope_ext's module for one of torchtune's, built where the old one's buffers live."""
    ours = REPLACES[_class_name(type(module))][0]
    kwargs = dict(dim=module.dim, max_seq_len=module.max_seq_len, base=module.base)
    if ours is Llama3ScaledRoPE:
        kwargs.update(scale_factor=module.scale_factor, low_freq_factor=module.low_freq_factor,
                      high_freq_factor=module.high_freq_factor,
                      old_context_len=module.old_context_len)
    buffer = module._buffers.get("cache", module._buffers.get("theta"))
    # A Llama3ScaledRoPE made on the meta device has no buffer yet: it stays unbuilt.
    device = buffer.device if buffer is not None else torch.device("meta")
    with torch.device(device):
        new = ours(**kwargs)
    cache = module._buffers.get("cache")
    if cache is not None and cache.shape[0] != new.max_seq_len:  # build_rope_cache(n) was called
        with torch.device(device):
            new.build_rope_cache(cache.shape[0])
    new.train(module.training)
    return new


def swap_modules(model: nn.Module) -> List[str]:
    """Replace, in place, every torchtune RoPE module of a built torchtune model with rope_ext's.

    torchtune's builders give all layers one shared RoPE module: it stays shared (one new
    module). The new module has the old one's arguments and buffers (same names, shapes,
    dtypes and devices, non-persistent: the state dict is unchanged; exact values), and is
    unbuilt where the old one was (a Llama3ScaledRoPE made on the meta device): the recipes'
    ``m.rope_init()`` after ``to_empty()`` builds it. Subclasses of torchtune's classes are
    left alone.

    Returns:
        The names of the replaced submodules (``"layers.0.attn.pos_embeddings"``, ...).

    Raises:
        RuntimeError: a torchtune RoPE class whose code is not the one rope_ext reproduces
            (another torchtune release changed it); nothing is replaced then.
    """
    targets = []
    for name, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in parent._modules.items():
            if child is not None and _class_name(type(child)) in REPLACES:
                targets.append((name, parent, child_name, child))
    for cls in {type(child) for *_, child in targets}:
        problems = verify(cls)
        if problems:
            details = "; ".join(f"{k}: {v}" for k, v in sorted(problems.items()))
            raise RuntimeError(
                f"rope_ext.torchtune reproduces torchtune 0.6.1's {cls.__qualname__}, but this "
                f"torchtune's differs ({details}); the model is left as it is")
    built: Dict[int, nn.Module] = {}
    replaced = []
    for name, parent, child_name, child in targets:
        if id(child) not in built:
            built[id(child)] = _replacement(child)
        setattr(parent, child_name, built[id(child)])
        replaced.append(f"{name}.{child_name}" if name else child_name)
    return replaced
