"""rope_ext.torchtune against torchtune's own RoPE modules and a float64 reference.

- Each drop-in against torchtune's module of the same name, through the module interface
  (constructor, buffers, forward(x, input_pos=...)): the same outputs within x's rounding, in
  float32 and bf16, with and without input_pos (packed samples), and gradients.
- Both against a float64 reference (inverse frequencies from torchtune's formulas, written out
  below in float64; the rotation from tests/reference.py): ours within one rounding, torchtune's
  within the bound of its float32 angles.
- swap_modules on tiny torchtune Llama 3, Llama 3.1 and Qwen2 models from torchtune's own
  component builders: the same logits, the module sharing and the state dict kept, and the
  recipes' meta-device build followed by ``rope_init()``.

Importing torchtune 0.6.1 here: its package ``__init__`` imports its datasets (Hugging Face
``datasets``, with pyarrow and pandas) and tokenizers, which none of this needs. Where those
are not installed, the package ``torchtune`` and the model packages are put in ``sys.modules``
without running their ``__init__`` (their directories as their paths), so that the RoPE
modules and the component builders, torchtune's own files, import as usual.
``torchtune.modules`` imports torchao's NF4 tensor at module level (for QLoRA's quantized
weights, which these tests never build); where torchao is not installed, a stand-in whose
functions raise is in ``sys.modules`` only while torchtune.modules is imported, then removed,
so that nothing else (transformers looks for torchao) ever sees it.
"""

import importlib
import importlib.util
import inspect
import math
import os
import sys
import types

import pytest
import torch

import reference as ref

if importlib.util.find_spec("torchtune") is None:
    pytest.skip("torchtune is not installed", allow_module_level=True)

_NEEDED_BY_INIT = ("datasets", "torchdata", "tiktoken", "sentencepiece", "blobfile", "omegaconf",
                   "kagglehub", "torchao")


def _packages_without_init(names):
    """Put packages in sys.modules without running their __init__ (see the module doc)."""
    for name in names:
        if name in sys.modules:
            continue
        parent, _, leaf = name.rpartition(".")
        if parent:
            path = [os.path.join(sys.modules[parent].__path__[0], leaf)]
        else:
            path = list(importlib.util.find_spec(name).submodule_search_locations)
        package = types.ModuleType(name)
        package.__path__ = path
        package.__file__ = os.path.join(path[0], "__init__.py")
        sys.modules[name] = package


def _import_modules_with_torchao_stand_in():
    """Import torchtune.modules with a temporary torchao stand-in (see the module doc)."""
    names = ("torchao", "torchao.dtypes", "torchao.dtypes.nf4tensor")
    stand_ins = {name: types.ModuleType(name) for name in names}
    nf4 = stand_ins["torchao.dtypes.nf4tensor"]

    class NF4Tensor(torch.Tensor):
        """Stand-in: no tensor is ever one."""

    def unavailable(*args, **kwargs):
        raise RuntimeError("torchao is not installed: NF4 (QLoRA) weights are unavailable")

    nf4.NF4Tensor, nf4.linear_nf4, nf4.to_nf4 = NF4Tensor, unavailable, unavailable
    nf4.implements = lambda ops: (lambda fn: fn)
    stand_ins["torchao"].dtypes = stand_ins["torchao.dtypes"]
    stand_ins["torchao.dtypes"].nf4tensor = nf4
    sys.modules.update(stand_ins)
    try:
        importlib.import_module("torchtune.modules")
        importlib.import_module("torchtune.modules.peft")
        importlib.import_module("torchtune.modules.low_precision")
    finally:
        for name in names:
            sys.modules.pop(name, None)


if not all(importlib.util.find_spec(m) is not None for m in _NEEDED_BY_INIT):
    _packages_without_init(["torchtune", "torchtune.models", "torchtune.models.llama3",
                            "torchtune.models.llama3_1", "torchtune.models.qwen2",
                            "torchtune.models.phi3"])
    if importlib.util.find_spec("torchao") is None and "torchtune.modules" not in sys.modules:
        _import_modules_with_torchao_stand_in()

import rope_ext.torchtune as rt  # noqa: E402
from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE  # noqa: E402
from torchtune.models.phi3._position_embeddings import (  # noqa: E402
    Phi3RotaryPositionalEmbeddings)
from torchtune.models.qwen2._positional_embeddings import (  # noqa: E402
    Qwen2RotaryPositionalEmbeddings)
from torchtune.modules.position_embeddings import RotaryPositionalEmbeddings  # noqa: E402

F32_ULP = 2.0 ** -24
TORCHTUNE = {cls.__name__: cls for cls in (RotaryPositionalEmbeddings, Llama3ScaledRoPE,
                                           Phi3RotaryPositionalEmbeddings,
                                           Qwen2RotaryPositionalEmbeddings)}
INTERLEAVED = {"RotaryPositionalEmbeddings": True, "Llama3ScaledRoPE": True,
               "Phi3RotaryPositionalEmbeddings": False, "Qwen2RotaryPositionalEmbeddings": False}
# Each module as a model uses it: Llama 3 (head_dim 128, theta 5e5), Llama 3.1 scaling,
# Phi-3 (head_dim 96), Qwen2 (head_dim 64, theta 1e6).
ARGS = {"RotaryPositionalEmbeddings": dict(dim=128, max_seq_len=8192, base=500_000),
        "Llama3ScaledRoPE": dict(dim=128, max_seq_len=8192, base=500_000),
        "Phi3RotaryPositionalEmbeddings": dict(dim=96, max_seq_len=4096),
        "Qwen2RotaryPositionalEmbeddings": dict(dim=64, max_seq_len=8192)}
NAMES = sorted(TORCHTUNE)


def build_pair(name, **overrides):
    kwargs = dict(ARGS[name], **overrides)
    return TORCHTUNE[name](**kwargs), getattr(rt, name)(**kwargs)


# ---------------------------------------------------------------------------------------------
# float64 reference: torchtune's frequency formulas in double precision


def ref_inv_freq(module):
    """The inverse frequencies of a torchtune RoPE module's arguments, computed in float64
    (RotaryPositionalEmbeddings.rope_init; Llama3ScaledRoPE.apply_scaling)."""
    d, base = module.dim, float(module.base)
    freqs = [base ** (-(2 * i) / d) for i in range(d // 2)]
    if hasattr(module, "scale_factor"):
        low_wavelen = module.old_context_len / module.low_freq_factor
        high_wavelen = module.old_context_len / module.high_freq_factor
        out = []
        for f in freqs:
            wavelen = 2 * math.pi / f
            if wavelen < high_wavelen:
                out.append(f)
            elif wavelen > low_wavelen:
                out.append(f / module.scale_factor)
            else:
                smooth = (module.old_context_len / wavelen - module.low_freq_factor) / (
                    module.high_freq_factor - module.low_freq_factor)
                out.append((1 - smooth) * f / module.scale_factor + smooth * f)
        freqs = out
    return torch.tensor(freqs, dtype=torch.float64)


def cache_cos_sin(module):
    """(cos, sin) [P, dim/2] out of a torchtune-layout cache (either module's)."""
    cache = module.cache
    if cache.dim() == 3:
        return cache[..., 0], cache[..., 1]
    d, half = module.dim, module.dim // 2
    assert torch.equal(cache[:, :half], cache[:, half:d])  # both copies hold the same values
    assert torch.equal(cache[:, d:d + half], cache[:, d + half:])
    return cache[:, :half], cache[:, d:d + half]


def float32_angle_bound(module, max_position):
    """torchtune's float32 angle fl(m * fl(theta_i)) is off by up to ~8 ulps of m * theta_i
    (theta_i takes a pow and a division, the Llama 3.1 blend a few more operations, the
    product one rounding); cos and sin of it add about one ulp."""
    return 8 * F32_ULP * max_position * ref_inv_freq(module).max().item() + 2 * F32_ULP


# Each side's error in x's dtype beyond the angle, in units of one rounding (PAIR_TOL: float32
# math, or one bf16 rounding of a float32 result). Ours: one, forward and backward. torchtune's
# adjacent-pair modules work on x.float(): one too. Phi-3's computes x * cos + rotated * sin
# in float32 (one rounding) but its backward sums the two paths' gradients in x's dtype (three);
# Qwen2's rounds cos and sin to x's dtype and computes in it (up to four, both ways).
def rotation_tol(name, dtype, theirs, grad=False):
    if theirs and dtype == torch.bfloat16:
        if name == "Qwen2RotaryPositionalEmbeddings":
            return 4 * ref.PAIR_TOL[dtype]
        if name == "Phi3RotaryPositionalEmbeddings" and grad:
            return 3 * ref.PAIR_TOL[dtype]
    return ref.PAIR_TOL[dtype]


# ---------------------------------------------------------------------------------------------
# The interface


@pytest.mark.parametrize("name", NAMES)
def test_interface_is_torchtunes(name):
    theirs, ours = build_pair(name)
    for method in ("__init__", "forward"):
        want = inspect.signature(getattr(TORCHTUNE[name], method))
        got = inspect.signature(getattr(type(ours), method))
        assert [(p.name, p.kind, p.default) for p in got.parameters.values()] == \
            [(p.name, p.kind, p.default) for p in want.parameters.values()], method
    for attr in ("dim", "base", "max_seq_len", "scale_factor", "low_freq_factor",
                 "high_freq_factor", "old_context_len", "is_cache_built"):
        assert getattr(ours, attr, None) == getattr(theirs, attr, None), attr
    assert dict(ours.named_buffers()).keys() == dict(theirs.named_buffers()).keys() \
        == {"theta", "cache"}
    for key in ("theta", "cache"):
        got, want = getattr(ours, key), getattr(theirs, key)
        assert (got.shape, got.dtype, got.device) == (want.shape, want.dtype, want.device)
    assert ours.state_dict().keys() == theirs.state_dict().keys() == set()  # non-persistent
    assert callable(ours.rope_init) and callable(ours.build_rope_cache)


def test_installed_torchtune_is_the_verified_form():
    for cls in TORCHTUNE.values():
        assert rt.verify(cls) == {}, cls


def test_changed_torchtune_code_is_refused(monkeypatch):
    import ast

    real = rt.module_tree

    def tree_with_qwen2_interleaved(module):
        tree = real(module)
        if module.__name__ == Qwen2RotaryPositionalEmbeddings.__module__:
            cls = next(n for n in tree.body if isinstance(n, ast.ClassDef))
            fwd = next(n for n in cls.body if isinstance(n, ast.FunctionDef)
                       and n.name == "forward")
            for node in ast.walk(fwd):  # x[..., : x.shape[-1] // 2] -> x[..., 0::2]
                if isinstance(node, ast.Subscript) and ast.unparse(node).startswith("x[..., :"):
                    node.slice = ast.parse("x[..., 0::2]").body[0].value.slice
        return tree

    monkeypatch.setattr(rt, "module_tree", tree_with_qwen2_interleaved)
    monkeypatch.setattr(rt, "_verified", {})
    assert rt.verify(Qwen2RotaryPositionalEmbeddings) == {"forward": "its code differs"}
    model = torch.nn.Sequential(Qwen2RotaryPositionalEmbeddings(8, 16))
    with pytest.raises(RuntimeError, match="Qwen2RotaryPositionalEmbeddings"):
        rt.swap_modules(model)
    assert type(model[0]) is Qwen2RotaryPositionalEmbeddings


# ---------------------------------------------------------------------------------------------
# Tables, rotation and gradients


@pytest.mark.parametrize("name", NAMES)
def test_tables_against_float64(name):
    theirs, ours = build_pair(name)
    rows = ours.max_seq_len
    want = ref.table(ref_inv_freq(theirs), rows)
    ours_err = torch.stack([(c.double() - w).abs().amax(1)
                            for c, w in zip(cache_cos_sin(ours), want)]).amax(0)
    theirs_err = torch.stack([(c.double() - w).abs().amax(1)
                              for c, w in zip(cache_cos_sin(theirs), want)]).amax(0)
    assert ours_err.max().item() <= F32_ULP / 2  # rounded once from float64
    m = torch.arange(rows, dtype=torch.float64)
    bound = 8 * F32_ULP * m * ref_inv_freq(theirs).max() + 2 * F32_ULP
    assert bool((theirs_err <= bound).all())
    assert ours_err[-256:].max() < theirs_err[-256:].max()
    # theta: float32 rounding of the float64 frequencies
    assert torch.equal(ours.theta, ref_inv_freq(theirs).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_rotation_and_gradient(name, packed, dtype):
    """Ours and torchtune's against float64 and against each other, output and gradient."""
    theirs, ours = build_pair(name)
    d, interleaved = theirs.dim, INTERLEAVED[name]
    g = torch.Generator().manual_seed(5)
    batch, seq = 2, 48
    if packed:  # samples packed end to end: positions restart at each, KV-cache offsets too
        input_pos = torch.stack([torch.cat([torch.arange(30), torch.arange(18)]),
                                 torch.arange(4000, 4000 + seq)])
    else:
        input_pos = None
    max_pos = 4000 + seq if packed else seq
    x64 = torch.randn(batch, seq, 6, d, generator=g, dtype=torch.float64)
    grad64 = torch.randn(batch, seq, 6, d, generator=g, dtype=torch.float64)
    cos64, sin64 = ref.table(ref_inv_freq(theirs), max_pos)
    angle = float32_angle_bound(theirs, max_pos)
    outs = {}
    for side, module in (("ours", ours), ("theirs", theirs)):
        x = x64.to(dtype).requires_grad_()
        out = module(x, input_pos=input_pos)
        assert out.dtype == dtype and out.shape == x.shape
        (dx,) = torch.autograd.grad(out, x, grad64.to(dtype))
        table_err = angle if side == "theirs" else F32_ULP
        tol = rotation_tol(name, dtype, side == "theirs") + table_err
        want = ref.rope(x.detach(), cos64, sin64, input_pos, interleaved)
        ref.assert_pairs_close(out.detach(), want, x.detach(), d, interleaved, tol=tol)
        grad_out = grad64.to(dtype)
        tol = rotation_tol(name, dtype, side == "theirs", grad=True) + table_err
        want = ref.rope(grad_out, cos64, sin64, input_pos, interleaved, inverse=True)
        ref.assert_pairs_close(dx, want, grad_out, d, interleaved, tol=tol)
        outs[side] = (x.detach(), out.detach(), dx)
    # the same outputs and gradients as torchtune's, within both sides' rounding and its angles
    x = outs["ours"][0]
    tol = rotation_tol(name, dtype, False) + rotation_tol(name, dtype, True) + angle
    ref.assert_pairs_close(outs["ours"][1], outs["theirs"][1].double(), x, d, interleaved,
                           tol=tol)
    tol = rotation_tol(name, dtype, False) + rotation_tol(name, dtype, True, grad=True) + angle
    ref.assert_pairs_close(outs["ours"][2], outs["theirs"][2].double(), grad64.to(dtype), d,
                           interleaved, tol=tol)


@pytest.mark.parametrize("name", NAMES)
def test_positions_forms(name):
    """input_pos [b, s], [1, s] and [s] mean what they mean to torchtune's module."""
    theirs, ours = build_pair(name)
    x = torch.randn(2, 9, 3, theirs.dim)
    pos = torch.arange(100, 109)
    for form in (pos.expand(2, -1), pos[None], pos):
        a, b = ours(x, input_pos=form), theirs(x, input_pos=form)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
        assert torch.equal(a, ours(x, input_pos=pos.expand(2, -1)))


def test_strided_x_and_bad_head_dim():
    _, ours = build_pair("RotaryPositionalEmbeddings")
    qkv = torch.randn(2, 10, 6, 128)
    q = qkv[:, :, :4]  # a slice of a fused projection: read in place
    torch.testing.assert_close(ours(q), ours(q.contiguous()), rtol=0, atol=0)
    with pytest.raises(ValueError, match="head_dim"):
        ours(torch.randn(2, 10, 4, 64))


def test_llama3_scaled_rope_on_meta():
    """As torchtune's: nothing built on the meta device, built by rope_init() later."""
    with torch.device("meta"):
        ours = rt.Llama3ScaledRoPE(64, max_seq_len=128)
        theirs = Llama3ScaledRoPE(64, max_seq_len=128)
    assert ours.is_cache_built is theirs.is_cache_built is False
    assert dict(ours.named_buffers()).keys() == dict(theirs.named_buffers()).keys() == set()
    with pytest.raises(RuntimeError, match="rope_init"):
        ours(torch.randn(1, 4, 2, 64))
    ours.rope_init()
    assert ours.is_cache_built and ours.cache.device.type == "cpu"
    assert torch.equal(ours.cache, rt.Llama3ScaledRoPE(64, max_seq_len=128).cache)


def test_dtype_cast_and_rebuild():
    theirs, ours = build_pair("Qwen2RotaryPositionalEmbeddings", max_seq_len=64)
    before = ours.cache.clone()
    ours.to(torch.bfloat16)
    assert ours.cache.dtype == ours.theta.dtype == torch.float32
    assert torch.equal(ours.cache, before)
    ours.build_rope_cache(100)  # what torchtune's build_rope_cache(n) does: n rows
    theirs.build_rope_cache(100)
    assert ours.cache.shape == theirs.cache.shape
    assert torch.equal(ours.cache[:64], before)


# ---------------------------------------------------------------------------------------------
# Whole models: torchtune's component builders, RoPE swapped in place

VOCAB = 64


def tiny_model(family):
    """A tiny model from torchtune's own component builder of a family."""
    kwargs = dict(vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=128,
                  max_seq_len=4096, intermediate_dim=256)
    if family == "llama3":
        from torchtune.models.llama3._component_builders import llama3
        return llama3(**kwargs)
    if family == "llama3_1":
        from torchtune.models.llama3_1._component_builders import llama3_1
        return llama3_1(**kwargs)
    from torchtune.models.qwen2._component_builders import qwen2
    return qwen2(**kwargs)


ROPE_OF = {"llama3": RotaryPositionalEmbeddings, "llama3_1": Llama3ScaledRoPE,
           "qwen2": Qwen2RotaryPositionalEmbeddings}


@pytest.mark.parametrize("family", ["llama3", "llama3_1", "qwen2"])
def test_swap_modules_in_a_torchtune_model(family):
    torch.manual_seed(0)
    model = tiny_model(family)
    old = [layer.attn.pos_embeddings for layer in model.layers]
    assert all(type(m) is ROPE_OF[family] for m in old) and old[0] is old[1]
    keys = model.state_dict().keys()
    tokens = torch.randint(0, VOCAB, (2, 40))
    input_pos = torch.cat([torch.arange(25), torch.arange(15)]).expand(2, -1)  # packed
    with torch.no_grad():
        before = [model(tokens), model(tokens, input_pos=input_pos)]
    names = rt.swap_modules(model)
    assert names == ["layers.0.attn.pos_embeddings", "layers.1.attn.pos_embeddings"]
    new = [layer.attn.pos_embeddings for layer in model.layers]
    assert type(new[0]) is getattr(rt, ROPE_OF[family].__name__) and new[0] is new[1]
    assert model.state_dict().keys() == keys
    with torch.no_grad():
        after = [model(tokens), model(tokens, input_pos=input_pos)]
    for a, b in zip(after, before):
        assert (a - b).norm() <= 1e-5 * b.norm()
    assert rt.swap_modules(model) == []  # nothing of torchtune's is left


def test_meta_device_build_then_rope_init_as_the_recipes_do():
    """torchtune's recipes build on the meta device, load weights, then call rope_init()."""
    torch.manual_seed(0)
    eager = tiny_model("llama3_1")
    rt.swap_modules(eager)
    with torch.device("meta"):
        meta = tiny_model("llama3_1")
    rt.swap_modules(meta)
    rope = meta.layers[0].attn.pos_embeddings
    assert type(rope) is rt.Llama3ScaledRoPE and not rope.is_cache_built
    meta.to_empty(device="cpu")
    meta.load_state_dict(eager.state_dict())
    with torch.device("cpu"):
        for m in meta.modules():
            if hasattr(m, "rope_init"):
                m.rope_init()
    tokens = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        assert torch.equal(meta(tokens), eager(tokens))
