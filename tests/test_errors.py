"""Bad input (docs/api.md section 8): every public entry point answers it with a Python exception
whose message names the argument; nothing crashes, hangs, reads out of bounds or silently
returns a wrong answer. Empty inputs return empty outputs; NaN and Inf pass through.

Convention: dtype problems (and arguments of the wrong Python type) raise TypeError; shapes,
ranks, values, devices, layout, rope_type, missing scaling keys, out-of-range positions and
overlapping in-place tensors raise ValueError. Every check matches the argument's name as a
whole word in the message.

The four ops share one argument check (csrc/rope_adapter.cpp: check_x, then check_arguments,
for apply, apply_, apply_qk and apply_qk_ alike), so test_rejected_at_op tries every bad value of
a kind once, at torch.ops.rope.apply (apply_qk for what concerns k), and test_propagates sends the
first value of each kind once through each Python wrapper that takes it (apply_rope and
apply_rope_qk, in place or not, RotaryEmbedding.forward), which must pass it on (the in-place
wrappers reach the in-place ops). test_ops_share_the_check below runs one kind through each op.

Cases that could take the interpreter down if a check were missing (positions outside the
table, in-place writes through overlapping or zero strides) run in one child interpreter
(`_isolated`), so that a segfault fails those tests instead of killing pytest.
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import reference as ref
import rope_ext

ops = torch.ops.rope

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent

B, S, H, D = 2, 4, 3, 8   # batch, seq, heads, head_dim
PAIRS = 4                 # r / 2: the table has PAIRS columns, r = 8 = D
P = 16                    # table rows

OPS = ("op.apply", "op.apply_", "op.apply_qk", "op.apply_qk_")
SINGLE = ("op.apply", "op.apply_", "apply_rope", "apply_rope[inplace]")
PAIR = ("op.apply_qk", "op.apply_qk_", "apply_rope_qk", "apply_rope_qk[inplace]")
ENTRIES = SINGLE + PAIR              # every entry point that takes cos/sin
ALL_ENTRIES = ENTRIES + ("module",)  # ... plus RotaryEmbedding.forward (its own table)
QK_ENTRIES = PAIR + ("module",)
WRAPPERS = ("apply_rope", "apply_rope[inplace]", "apply_rope_qk", "apply_rope_qk[inplace]",
            "module")


def table(rows=P, pairs=PAIRS, dtype=torch.float32):
    inv_freq, attn = rope_ext.rope_frequencies(2 * pairs)
    return rope_ext.cos_sin_table(inv_freq, rows, attn, dtype=dtype)


def xname(entry):
    """The name the library gives the first tensor to rotate."""
    return "x" if entry in SINGLE else "q"


def call(entry, x, cos=None, sin=None, positions=None, k=None, layout=None):
    """Run one entry point. cos/sin default to a [P, PAIRS] table; k defaults to a copy of x;
    layout defaults to "thd" for 3-D x, "bshd" otherwise (the module ignores cos/sin and
    builds its own [P, PAIRS] table)."""
    if cos is None:
        cos, sin = table()
    if layout is None:
        layout = "thd" if x.dim() == 3 else "bshd"
    if entry in QK_ENTRIES and k is None:
        k = x.clone()
    if entry == "op.apply":
        return ops.apply(x, cos, sin, positions)
    if entry == "op.apply_":
        return ops.apply_(x, cos, sin, positions)
    if entry == "op.apply_qk":
        return ops.apply_qk(x, k, cos, sin, positions)
    if entry == "op.apply_qk_":
        return ops.apply_qk_(x, k, cos, sin, positions)
    if entry == "apply_rope":
        return rope_ext.apply_rope(x, cos, sin, positions, layout=layout)
    if entry == "apply_rope[inplace]":
        return rope_ext.apply_rope(x, cos, sin, positions, layout=layout, inplace=True)
    if entry == "apply_rope_qk":
        return rope_ext.apply_rope_qk(x, k, cos, sin, positions, layout=layout)
    if entry == "apply_rope_qk[inplace]":
        return rope_ext.apply_rope_qk(x, k, cos, sin, positions, layout=layout, inplace=True)
    if entry == "module":
        rope = rope_ext.RotaryEmbedding(D, rotary_dim=2 * PAIRS, max_positions=P, layout=layout)
        return rope(x, k, positions)
    raise AssertionError(entry)


def word(name):
    return rf"\b{re.escape(name)}\b"


def x4(dtype=torch.float32, shape=(B, S, H, D)):
    return torch.randn(shape, dtype=torch.float64).to(dtype)


def arange_pos(dtype=torch.int64):
    return torch.arange(S, dtype=dtype).expand(B, S).contiguous()


def reference(x, cos, sin, positions=None, interleaved=False):
    """tests/reference.py's float64 rotation, rounded to x's dtype."""
    return ref.rope(x, cos, sin, positions, interleaved).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Argument checks: every value at the op, the first value of each kind through each wrapper.
# kind: (exception type(s), the argument the message names (a name, a function of the entry
# point, or a regex), the entry points that take it, the bad values, call()'s kwargs for one).
# ---------------------------------------------------------------------------------------------

META_EXC = (ValueError, RuntimeError, NotImplementedError)
NOT_MODULE = ENTRIES  # the module builds its own table: cos/sin cases do not apply to it
Q_AND_K = r"\bk\b.*\bq\b|\bq\b.*\bk\b"
K_HEAD_DIM = r"\bhead_dim\b.*(\bk\b|\bk's\b)|(\bk\b|\bk's\b).*\bhead_dim\b"


def _tables(shape):
    return dict(cos=torch.ones(shape), sin=torch.ones(shape))


KINDS = {
    # dtypes: TypeError
    "non_float_x": (TypeError, xname, ALL_ENTRIES,
                    [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64, "thd"],
                    lambda v: dict(x=torch.ones(S, H, D, dtype=torch.int32),
                                   positions=torch.arange(S)) if v == "thd" else
                    dict(x=torch.ones(B, S, H, D).to(v))),
    "positions_dtype": (TypeError, "positions", ALL_ENTRIES,
                        [torch.float32, torch.float64, torch.bool, torch.int16, torch.uint8],
                        lambda v: dict(x=x4(), positions=torch.zeros(B, S).to(v))),
    "table_dtype": (TypeError, "cos", NOT_MODULE,
                    [(torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16),
                     (torch.float32, torch.float16), (torch.float32, torch.bfloat16),
                     (torch.float16, torch.int32), (torch.float32, torch.int64),
                     (torch.float32, torch.bool), (torch.float32, torch.complex64)],
                    lambda v: dict(x=x4(v[0]), cos=table()[0].to(v[1]), sin=table()[1].to(v[1]),
                                   positions=arange_pos())),
    "cos_sin_dtype_mismatch": (TypeError, "sin", NOT_MODULE,
                               [(torch.float32, torch.float64), (torch.float64, torch.float32),
                                (torch.float16, torch.float32)],
                               lambda v: dict(x=x4(torch.float16), cos=table()[0].to(v[0]),
                                              sin=table()[1].to(v[1]), positions=arange_pos())),
    "q_k_dtype_mismatch": (TypeError, "k", QK_ENTRIES,
                           [(torch.float32, torch.float16), (torch.bfloat16, torch.float16),
                            (torch.float32, torch.float64), (torch.float32, torch.int64)],
                           lambda v: dict(x=x4(v[0]), k=x4().to(v[1]), positions=arange_pos())),
    # ranks and shapes: ValueError
    "x_rank": (ValueError, xname, ALL_ENTRIES, [(S * H, D), (D,), (1, B, S, H, D), (B, S, H, D, 1)],
               lambda v: dict(x=torch.randn(v), layout="bshd")),
    "k_rank": (ValueError, "k", QK_ENTRIES, [(S, D), (B, S, H, D, 1)],
               lambda v: dict(x=x4(), k=torch.randn(v))),
    "cos_rank": (ValueError, "cos", NOT_MODULE,
                 [(s, p) for s in [(PAIRS,), (1, 1, P, PAIRS), (), (B, S, 1, PAIRS)]
                  for p in (False, True)],
                 lambda v: dict(x=x4(), **_tables(v[0]), positions=arange_pos() if v[1] else None)),
    "cos_sin_shape_mismatch": (ValueError, "sin", NOT_MODULE,
                               [((P, PAIRS), (P, PAIRS - 1)), ((P, PAIRS), (P - 1, PAIRS)),
                                ((P, PAIRS), (1, P, PAIRS)), ((B, S, PAIRS), (1, S, PAIRS))],
                               lambda v: dict(x=x4(), cos=torch.ones(v[0]), sin=torch.ones(v[1]))),
    "rotary_dim_exceeds_head_dim": (ValueError, "head_dim", NOT_MODULE, [False, True],
                                    lambda v: dict(x=x4(), cos=table(pairs=D // 2 + 1)[0],
                                                   sin=table(pairs=D // 2 + 1)[1],
                                                   positions=arange_pos() if v else None)),
    # q holds r, k's head_dim is smaller: the message must point at k.
    "rotary_dim_exceeds_k_head_dim": (ValueError, K_HEAD_DIM, PAIR, [D - 2],
                                      lambda v: dict(x=x4(), k=torch.randn(B, S, 1, v),
                                                     positions=arange_pos())),
    "per_token_table_shape": (ValueError, "cos", NOT_MODULE,
                              [(B + 1, S, PAIRS), (B, S + 1, PAIRS), (B, S - 1, PAIRS),
                               (1, S + 1, PAIRS), (B, 1, PAIRS)],
                              lambda v: dict(x=x4(), **_tables(v))),
    "table_shorter_than_seq": (ValueError, "cos", NOT_MODULE, [S - 1],
                               lambda v: dict(x=x4(), cos=table(rows=v)[0], sin=table(rows=v)[1])),
    "positions_shape": (ValueError, "positions", ALL_ENTRIES,
                        [(B, S + 1), (B, S, 1), (1, B, S), (B + 1, S), (S + 1,), (S - 1,),
                         (B * S,), (0,), (1,), ()],
                        lambda v: dict(x=x4(), positions=torch.zeros(v, dtype=torch.int64))),
    "positions_shape_thd": (ValueError, "positions", ALL_ENTRIES,
                            [(S + 1,), (S - 1,), (1, S), (S, 1), ()],
                            lambda v: dict(x=torch.randn(S, H, D),
                                           positions=torch.zeros(v, dtype=torch.int32))),
    "thd_without_positions": (ValueError, "positions", ALL_ENTRIES, [None],
                              lambda v: dict(x=torch.randn(S, H, D))),
    # [S, PAIRS] reads as a table of S rows, [1, S, PAIRS] as per-token rows: thd needs positions.
    "thd_per_token_table_without_positions": (ValueError, "positions", NOT_MODULE,
                                              [(1, S, PAIRS), (S, PAIRS)],
                                              lambda v: dict(x=torch.randn(S, H, D), **_tables(v))),
    "per_token_table_with_positions": (ValueError, "positions", NOT_MODULE,
                                       [(B, S, PAIRS), (1, S, PAIRS), (1, P, PAIRS)],
                                       lambda v: dict(x=x4(), **_tables(v),
                                                      positions=arange_pos())),
    # (the wrappers' rank check sees a 3-D k first, for layout bshd: k_rank)
    "q_k_token_dims_differ": (ValueError, Q_AND_K, QK_ENTRIES,
                              [(B + 1, S, H, D), (B, S + 1, H, D), (1, S, H, D), (B, 1, H, D),
                               (S, H, D), "thd"],
                              lambda v: dict(x=torch.randn(S, H, D), k=torch.randn(S + 1, H, D),
                                             positions=torch.arange(S)) if v == "thd" else
                              dict(x=x4(), k=torch.randn(v))),
    # devices (all of them at the op: test_meta_mixed_with_cpu)
    "meta_positions": (META_EXC, "positions", NOT_MODULE, [None],
                       lambda v: dict(x=x4(), positions=arange_pos().to("meta"))),
    "meta_k": (META_EXC, "k", QK_ENTRIES, [None],
               lambda v: dict(x=x4(), k=x4().to("meta"), positions=arange_pos())),
}


def _expect_raises(kind, entry, value):
    exc, name, _, _, make = KINDS[kind]
    pattern = word(name(entry)) if callable(name) else name if "\\" in name else word(name)
    with pytest.raises(exc, match=pattern):
        call(entry, **make(value))


@pytest.mark.parametrize("kind,value", [(k, v) for k, spec in KINDS.items() for v in spec[3]])
def test_rejected_at_op(kind, value):
    _expect_raises(kind, "op.apply" if "op.apply" in KINDS[kind][2] else "op.apply_qk", value)


@pytest.mark.parametrize("entry,kind", [(e, k) for k, spec in KINDS.items() for e in spec[2]
                                        if e in WRAPPERS])
def test_propagates(entry, kind):
    _expect_raises(kind, entry, KINDS[kind][3][0])


@pytest.mark.parametrize("entry", OPS)
def test_ops_share_the_check(entry):
    """Each of the four ops runs the shared check: a bad value of x, of positions, of the
    table, and (the qk ops) of k, are each answered with the argument's name."""
    for kind in ("non_float_x", "positions_dtype", "table_dtype") + (
            ("q_k_dtype_mismatch",) if entry in PAIR else ()):
        _expect_raises(kind, entry, KINDS[kind][3][0])


@pytest.mark.parametrize("entry", OPS)
def test_table_dtype_allowed(entry):
    # float32, float64 and x's own dtype are accepted (the contrast to table_dtype).
    for t_dtype in (torch.float32, torch.float64, torch.bfloat16):
        cos, sin = table()
        call(entry, x4(torch.bfloat16), cos.to(t_dtype), sin.to(t_dtype), arange_pos())


@pytest.mark.parametrize("bad", [[[1.0] * D], 3.0, None])
def test_apply_rope_x_not_a_tensor(bad):
    cos, sin = table()
    with pytest.raises(TypeError, match=word("x")):
        rope_ext.apply_rope(bad, cos, sin)
    with pytest.raises(TypeError, match=word("q")):
        rope_ext.apply_rope_qk(bad, x4(), cos, sin)
    with pytest.raises(TypeError, match=word("k")):
        rope_ext.apply_rope_qk(x4(), bad, cos, sin)


def test_module_seq_longer_than_max_positions_is_no_error():
    # max_positions is a size hint: a longer sequence grows the table (test_any_position.py).
    rope = rope_ext.RotaryEmbedding(D, max_positions=S - 1)
    q, k = rope(x4(), x4())
    assert q.shape == x4().shape and rope.cos.shape[0] == S


# ---------------------------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["sbhd", "BSHD", "", "bsh", None, 4])
def test_unknown_layout(layout):
    cos, sin = table()
    with pytest.raises(ValueError, match=word("layout")):
        rope_ext.apply_rope(x4(), cos, sin, layout=layout)
    with pytest.raises(ValueError, match=word("layout")):
        rope_ext.apply_rope(x4(), cos, sin, layout=layout, inplace=True)
    with pytest.raises(ValueError, match=word("layout")):
        rope_ext.apply_rope_qk(x4(), x4(), cos, sin, layout=layout)
    with pytest.raises(ValueError, match=word("layout")):
        rope_ext.RotaryEmbedding(D, layout=layout)


RANK_VS_LAYOUT = [("bshd", (S, H, D)), ("bhsd", (S, H, D)), ("thd", (B, S, H, D)),
                  ("thd", (S, D)), ("bhsd", (B, H, S, D, 1))]

# The shape each layout asks for, spelled out (an earlier message chained str.replace over
# the layout's letters and garbled it: "[batcheahead_dims, ...]").
LAYOUT_SHAPE = {"bshd": "[batch, seq, heads, head_dim]", "bhsd": "[batch, heads, seq, head_dim]",
                "thd": "[tokens, heads, head_dim]"}


# Every mismatch through apply_rope; two of them through each other wrapper.
@pytest.mark.parametrize("entry,layout,shape", [("apply_rope", lay, sh)
                                                for lay, sh in RANK_VS_LAYOUT] +
                         [(e, lay, sh) for e in WRAPPERS[1:] for lay, sh in RANK_VS_LAYOUT[1:3]])
def test_x_rank_does_not_match_layout(entry, layout, shape):
    positions = torch.arange(S)
    with pytest.raises(ValueError, match=word(xname(entry))) as info:
        call(entry, torch.randn(shape), positions=positions, layout=layout)
    assert re.search(word("layout"), str(info.value)), str(info.value)
    assert LAYOUT_SHAPE[layout] in str(info.value), str(info.value)


@pytest.mark.parametrize("layout,shape", RANK_VS_LAYOUT)
def test_fused_norm_rank_does_not_match_layout(layout, shape):
    cos, sin = table()
    weight = torch.ones(D)
    with pytest.raises(ValueError, match=word("q")) as info:
        rope_ext.rms_norm_rope_qk(torch.randn(shape), torch.randn(shape), cos, sin,
                                  positions=torch.arange(S), q_weight=weight, k_weight=weight,
                                  layout=layout)
    assert LAYOUT_SHAPE[layout] in str(info.value), str(info.value)


# ---------------------------------------------------------------------------------------------
# rope_frequencies, cos_sin_table, the RotaryEmbedding constructor
# ---------------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


def _inv():
    return rope_ext.rope_frequencies(2 * PAIRS)[0]


def _frequencies(rotary_dim=2 * PAIRS, base=10000.0, scaling=None):
    return rope_ext.rope_frequencies(rotary_dim, base, scaling)


def _table(inv_freq=None, max_positions=P, attention_factor=1.0, dtype=torch.float32):
    return rope_ext.cos_sin_table(_inv() if inv_freq is None else inv_freq, max_positions,
                                  attention_factor, dtype=dtype)


def _module(**kwargs):
    return rope_ext.RotaryEmbedding(kwargs.pop("head_dim", D), **kwargs)


# (function, exception, the argument the message names, bad values of it)
BAD_ARGUMENTS = [
    (_frequencies, ValueError, "rotary_dim", [7, 1, 0, -2, -8]),
    (_frequencies, TypeError, "rotary_dim", [8.0, "8", None, [8], True]),
    (_frequencies, ValueError, "base", [1, 1.0, 0.5, 0.0, -10000.0, NAN, INF, -INF]),
    (_frequencies, TypeError, "scaling", [["linear", 2.0], "linear", 2.0, ("rope_type", "linear")]),
    (_table, ValueError, "inv_freq", [torch.ones(2, PAIRS, dtype=torch.float64),
                                      torch.ones((), dtype=torch.float64), torch.ones(1, PAIRS)]),
    (_table, TypeError, "inv_freq", [torch.ones(PAIRS, dtype=dt)
                                     for dt in (torch.int64, torch.int32, torch.bool)]),
    (_table, ValueError, "max_positions", [-1, -P]),
    (_table, TypeError, "max_positions", [16.0, 1.5, "16", None, torch.tensor(16)]),
    (_table, ValueError, "attention_factor", [0, 0.0, -1.0, NAN, INF]),
    (_table, TypeError, "dtype", [torch.int32, torch.int64, torch.bool, torch.uint8, "float32",
                                  float]),
    (_module, ValueError, "max_positions", [-1, -P]),
    (_module, TypeError, "max_positions", [16.0, 1.5, "16", None, torch.tensor(16)]),
    (_module, ValueError, "head_dim", [0, -8]),
    (_module, ValueError, "rotary_dim", [7, 0, -4]),
    (_module, ValueError, "base", [1.0, 0.0, NAN]),
]


@pytest.mark.parametrize("fn,exc,name,value", [
    pytest.param(fn, exc, name, v, id=f"{fn.__name__[1:]}-{name}-{i}")
    for fn, exc, name, values in BAD_ARGUMENTS for i, v in enumerate(values)])
def test_bad_argument(fn, exc, name, value):
    with pytest.raises(exc, match=word(name)):
        fn(**{name: value})


@pytest.mark.parametrize("scaling", [{"rope_type": "foo", "factor": 2.0},
                                     {"type": "ntk", "factor": 2.0},
                                     {"rope_type": "", "factor": 2.0},
                                     {"rope_type": "LINEAR", "factor": 2.0},
                                     {"rope_type": ["linear"], "factor": 2.0}])
def test_unknown_rope_type(scaling):
    with pytest.raises(ValueError, match=word("rope_type")):
        rope_ext.rope_frequencies(8, 10000.0, scaling)
    with pytest.raises(ValueError, match=word("rope_type")):
        rope_ext.RotaryEmbedding(D, scaling=scaling)


# Complete dicts of each rope_type (docs/math.md section 9.1: required keys) and the keys whose
# absence must be reported.
COMPLETE = {
    "linear": ({"rope_type": "linear", "factor": 2.0}, ["factor"]),
    "linear(type)": ({"type": "linear", "factor": 2.0}, ["factor"]),
    "dynamic": ({"rope_type": "dynamic", "factor": 2.0}, ["factor"]),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
             ["factor", "original_max_position_embeddings"]),
    "longrope": ({"rope_type": "longrope", "short_factor": [1.0] * PAIRS,
                  "long_factor": [2.0] * PAIRS, "original_max_position_embeddings": 4096},
                 ["short_factor", "long_factor", "original_max_position_embeddings"]),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
               ["factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings"]),
}
MISSING = [(kind, key) for kind, (_, keys) in COMPLETE.items() for key in keys]


@pytest.mark.parametrize("kind", list(COMPLETE))
def test_complete_scaling_accepted(kind):
    # The contrast to test_missing_scaling_key: with every required key the dict is accepted.
    inv_freq, attn = rope_ext.rope_frequencies(2 * PAIRS, 10000.0, dict(COMPLETE[kind][0]))
    assert inv_freq.shape == (PAIRS,)
    assert math.isfinite(attn) and attn > 0


@pytest.mark.parametrize("kind,key", MISSING)
def test_missing_scaling_key(kind, key):
    scaling = dict(COMPLETE[kind][0])
    del scaling[key]
    with pytest.raises(ValueError, match=word("scaling")) as info:
        rope_ext.rope_frequencies(2 * PAIRS, 10000.0, scaling)
    assert key in str(info.value), str(info.value)


def test_missing_scaling_key_module():
    with pytest.raises(ValueError, match=word("scaling")) as info:
        rope_ext.RotaryEmbedding(D, scaling={"rope_type": "linear"})
    assert "factor" in str(info.value), str(info.value)


@pytest.mark.parametrize("factor", [0, 0.0, -2.0, NAN])
@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn", "llama3"])
def test_scaling_factor_value(kind, factor):
    scaling = dict(COMPLETE[kind][0], factor=factor)
    with pytest.raises(ValueError, match=word("factor")):
        rope_ext.rope_frequencies(2 * PAIRS, 10000.0, scaling)


@pytest.mark.parametrize("head_dim,rotary_dim", [(8, 10), (8, 16), (2, 4)])
def test_module_rotary_dim_exceeds_head_dim(head_dim, rotary_dim):
    with pytest.raises(ValueError, match=word("rotary_dim")) as info:
        rope_ext.RotaryEmbedding(head_dim, rotary_dim=rotary_dim)
    assert re.search(word("head_dim"), str(info.value)), str(info.value)


# ---------------------------------------------------------------------------------------------
# in place: what needs a gradient is refused (not-crashing cases; overlap is in _isolated)
# ---------------------------------------------------------------------------------------------


def test_inplace_refuses_requires_grad():
    cos, sin = table()
    x = torch.randn(B, S, H, D, requires_grad=True)
    with pytest.raises(ValueError, match=word("x")):
        ops.apply_(x, cos, sin)
    with pytest.raises(ValueError, match=word("x")):
        rope_ext.apply_rope(x, cos, sin, inplace=True)
    with pytest.raises(ValueError, match=word("q")):
        ops.apply_qk_(x, torch.randn(B, S, H, D), cos, sin)
    with pytest.raises(ValueError, match=word("k")):
        ops.apply_qk_(torch.randn(B, S, H, D), x, cos, sin)
    with torch.no_grad():  # allowed there
        ops.apply_(x, cos, sin)


# ---------------------------------------------------------------------------------------------
# devices
# ---------------------------------------------------------------------------------------------

DEVICE_MIX = [
    ("positions", lambda x, cos, sin, pos: (x, cos, sin, pos.to("meta"))),
    ("cos", lambda x, cos, sin, pos: (x, cos.to("meta"), sin, pos)),
    ("cos", lambda x, cos, sin, pos: (x, cos.to("meta"), sin.to("meta"), pos)),
    ("sin", lambda x, cos, sin, pos: (x, cos, sin.to("meta"), pos)),
    ("cos", lambda x, cos, sin, pos: (x.to("meta"), cos, sin, pos)),
]


@pytest.mark.parametrize("case", range(len(DEVICE_MIX)),
                         ids=["meta_positions", "meta_cos", "meta_cos_sin", "meta_sin", "meta_x"])
def test_meta_mixed_with_cpu(case):
    """A meta tensor among CPU ones is a device mismatch: it must raise (as torch's own ops do),
    not dispatch to the fake kernel and hand back an uninitialized CPU tensor (every entry
    point: test_propagates' meta_positions and meta_k)."""
    entry = "op.apply"
    name, mix = DEVICE_MIX[case]
    cos, sin = table()
    x, cos, sin, pos = mix(x4(), cos, sin, arange_pos())
    with pytest.raises((ValueError, RuntimeError, NotImplementedError)) as info:
        call(entry, x, cos, sin, pos)
    msg = str(info.value)
    if x.is_meta:  # x on meta, the rest on the CPU: naming any of them is fine
        assert re.search(r"\bcos\b|\bsin\b|\bpositions\b", msg), msg
    else:
        assert re.search(word(name), msg), msg


@pytest.mark.parametrize("entry", ENTRIES)
def test_all_meta_is_shape_propagation(entry):
    # Everything on meta: the fake kernel answers with x's shape and device, nothing crashes.
    cos, sin = table()
    x = x4().to("meta")
    out = call(entry, x, cos.to("meta"), sin.to("meta"), arange_pos().to("meta"))
    if entry in ("op.apply", "apply_rope"):
        assert out.is_meta and out.shape == x.shape
    elif entry in ("op.apply_qk", "apply_rope_qk"):
        assert all(t.is_meta and t.shape == x.shape for t in out)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# One of each kind through every entry point (cos, sin or positions alone on the CPU at the op:
# tests/test_cuda.py's test_table_on_another_device_raises, which gpu-check runs).
CUDA_CASES = [("op.apply", "x_on_cpu"), ("op.apply_qk", "k")] + \
             [(e, "cos") for e in ENTRIES[1:]] + [(e, "k") for e in PAIR[1:]]


@needs_cuda
@pytest.mark.parametrize("entry,what", CUDA_CASES)
def test_cuda_cpu_mismatch(entry, what):
    dev = torch.device("cuda")
    cos, sin = table()
    x, pos = x4().to(dev), arange_pos().to(dev)
    cos, sin = cos.to(dev), sin.to(dev)
    k = None
    name = what
    if what == "cos":
        cos = cos.cpu()
    elif what == "sin":
        sin = sin.cpu()
    elif what == "positions":
        pos = pos.cpu()
    elif what == "k":
        k = x4()
    else:  # x on the CPU, the table on the GPU
        x, pos = x.cpu(), pos.cpu()
        name = "cos"
    with pytest.raises(ValueError, match=word(name)):
        call(entry, x, cos, sin, pos, k=k)


@needs_cuda
def test_cuda_module_positions_on_cpu():
    rope = rope_ext.RotaryEmbedding(D, max_positions=P).cuda()
    q = x4().cuda()
    with pytest.raises(ValueError, match=word("positions")):
        rope(q, q.clone(), arange_pos())
    with pytest.raises(ValueError, match=r"\bq\b|\bcos\b"):
        rope(x4(), x4(), arange_pos())  # q, k on CPU, the module's table on the GPU


# ---------------------------------------------------------------------------------------------
# empty inputs do not raise; NaN and Inf pass through
# ---------------------------------------------------------------------------------------------

EMPTY_SHAPES = [(0, S, H, D), (B, 0, H, D), (B, S, 0, D), (0, 0, 0, D), (0, H, D), (S, 0, D)]


# Every empty shape through each op (each returns early on its own); two through each wrapper.
EMPTY_CASES = [(e, s, p) for e in OPS for s in EMPTY_SHAPES for p in (False, True)] + \
              [(e, s, True) for e in WRAPPERS for s in ((B, 0, H, D), (0, H, D))]


@pytest.mark.parametrize("entry,shape,with_positions", EMPTY_CASES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else None)
def test_empty_inputs(entry, shape, with_positions):
    x = torch.randn(shape)
    thd = len(shape) == 3
    if thd and not with_positions:
        return  # thd always needs positions; covered by test_thd_without_positions
    positions = None
    if with_positions:
        n = shape[0] if thd else shape[1]
        positions = torch.arange(n) if thd else torch.arange(n).expand(shape[0], n)
    before = x.clone()
    out = call(entry, x, positions=positions)
    if entry in ("op.apply_", "op.apply_qk_"):
        assert out is None
        outs = [x]
    elif entry in SINGLE:
        outs = [out]
    else:
        outs = list(out)
    for o in outs:
        assert o.shape == x.shape and o.dtype == x.dtype and o.numel() == 0
    assert torch.equal(x, before)


@pytest.mark.parametrize("entry", ("op.apply", "op.apply_", "apply_rope"))
def test_empty_table_with_no_tokens(entry):
    cos, sin = table(rows=0)
    out = call(entry, torch.randn(0, H, D), cos, sin, torch.zeros(0, dtype=torch.int32))
    if out is not None:
        assert out.shape == (0, H, D)
    out = call(entry, torch.randn(B, 0, H, D), cos, sin)
    if out is not None:
        assert out.shape == (B, 0, H, D)


@pytest.mark.parametrize("entry", ("op.apply_qk", "op.apply_qk_", "apply_rope_qk",
                                   "apply_rope_qk[inplace]"))
def test_k_with_zero_heads(entry):
    # Grouped-query shapes down to zero k heads: q is rotated, k comes back empty.
    cos, sin = table()
    q, k = x4(), torch.randn(B, S, 0, D)
    expect = reference(q, cos, sin, arange_pos())
    out = call(entry, q, cos, sin, arange_pos(), k=k)
    qo, ko = (q, k) if out is None or entry.endswith("[inplace]") else out
    torch.testing.assert_close(qo, expect)
    assert ko.shape == (B, S, 0, D)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_nan_inf_pass_through(dtype, interleaved):
    cos, sin = table()
    x = x4(dtype, (1, S, 2, D))
    x[0, 0, 0, 1] = float("nan")
    x[0, 1, 1, 2] = float("inf")
    x[0, 2, 0, 0] = -float("inf")
    x[0, 3, 1, 7] = float("nan")
    expect = reference(x, cos, sin, interleaved=interleaved)
    out = ops.apply(x, cos, sin, None, interleaved, False)
    torch.testing.assert_close(out, expect, equal_nan=True)
    # Only the pairs holding a NaN or Inf are touched: other heads and tokens stay finite.
    assert torch.isfinite(out[0, 0, 1]).all() and torch.isfinite(out[0, 1, 0]).all()
    y = x.clone()
    rope_ext.apply_rope(y, cos, sin, interleaved=interleaved, inplace=True)
    torch.testing.assert_close(y, expect, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# Isolated: cases that could crash the interpreter run in one child process.
#
# Each case returns (act, post): act() is the call under test; post() is checked after it:
# for a rejected call, that nothing was written; for an accepted one, that the result is right.
# EXPECT maps the case to (exception name, regex the message must match) or None (must succeed).
# ---------------------------------------------------------------------------------------------

ISOLATED = {}
EXPECT = {}


def _isolated(name, expect):
    def register(fn):
        ISOLATED[name] = fn
        EXPECT[name] = expect
        return fn
    return register


OUT_OF_RANGE = [("int64", -1), ("int64", P), ("int64", P + 1), ("int64", 2**31),
                ("int64", 2**40), ("int64", -2**40), ("int64", 2**63 - 1), ("int64", -2**63),
                ("int32", -1), ("int32", P), ("int32", 2**31 - 1), ("int32", -2**31)]


def _out_of_range_case(entry, dtype_name, value, thd):
    dtype = getattr(torch, dtype_name)

    def case():
        cos, sin = table()
        if thd:
            x = x4(shape=(B * S, H, D))
            positions = torch.arange(B * S, dtype=dtype) % P
            positions[B * S // 2] = value
        else:
            x = x4()
            positions = arange_pos(dtype)
            positions[1, 2] = value  # one bad value in the middle
        k = x.clone() + 1
        before, k_before = x.clone(), k.clone()

        def act():
            call(entry, x, cos, sin, positions, k=k)

        def post():
            return torch.equal(x, before) and torch.equal(k, k_before)
        return act, post
    return case


# Every value at op.apply (the check is one pass over the positions, shared by the four ops);
# below and past the table (and past 2**31 for the module, which rotates any position below it:
# tests/test_any_position.py) through every other entry point, nothing written by in-place ones.
for _entry in ALL_ENTRIES:
    for _dt, _v in OUT_OF_RANGE:
        for _thd in (False, True):
            if _thd and _v not in (-1, P, 2**40, -2**31):
                continue
            if _entry != "op.apply" and _v not in ((-1, 2**40) if _entry == "module" else (-1, P)):
                continue
            if _entry != "op.apply" and (_dt, _thd) != ("int64", _v == -1):
                continue
            _name = f"positions_out_of_range[{_entry}-{_dt}-{_v}{'-thd' if _thd else ''}]"
            ISOLATED[_name] = _out_of_range_case(_entry, _dt, _v, _thd)
            EXPECT[_name] = ("ValueError", word("positions"))


@_isolated("positions_out_of_range_1s[op.apply]", ("ValueError", word("positions")))
def _case_pos_1s():
    cos, sin = table()
    positions = torch.arange(S)[None].clone()
    positions[0, -1] = P

    def act():
        ops.apply(x4(), cos, sin, positions)
    return act, lambda: True


@_isolated("positions_out_of_range_message_advice", ("ValueError", word("positions")))
def _case_pos_message():
    # The advice in the message ("build a longer table with max_positions=N") must not be a
    # nonsense negative number when the position is the largest int64.
    cos, sin = table()
    positions = torch.full((S,), 2**63 - 1)

    def act():
        try:
            ops.apply(x4(), cos, sin, positions)
        except ValueError as e:
            assert not re.search(r"max_positions=-", str(e)), str(e)
            raise
    return act, lambda: True


@_isolated("positions_bad_value_outside_the_view", None)
def _case_pos_view():
    # A bad value in memory that the positions view skips must not be read or rejected.
    cos, sin = table()
    full = torch.arange(2 * S).expand(B, 2 * S).contiguous() % P
    full[:, 1::2] = 10**12
    positions = full[:, ::2]
    x = x4()

    def act():
        act.out = ops.apply(x, cos, sin, positions)

    def post():
        return torch.allclose(act.out, reference(x, cos, sin, positions.contiguous()))
    return act, post


@_isolated("positions_zero_stride", None)
def _case_pos_zero_stride():
    cos, sin = table()
    positions = (torch.arange(S) + 3)[None].expand(B, S)
    x = x4()

    def act():
        act.out = ops.apply(x, cos, sin, positions)

    def post():
        return torch.allclose(act.out, reference(x, cos, sin, positions.contiguous()))
    return act, post


@_isolated("positions_out_of_range_module_forward_past_2_31", ("ValueError", word("positions")))
def _case_module_pos():
    # Past max_positions is fine (computed rows); past 2**31 is not.
    rope = rope_ext.RotaryEmbedding(D, max_positions=P)
    q, k = x4(), x4()
    positions = torch.full((B, S), 2**31)

    def act():
        rope(q, k, positions)
    return act, lambda: True


def _expanded():
    return torch.randn(1, S, 1, D).expand(B, S, H, D)


def _inplace_overlap(fn, name):
    def case():
        cos, sin = table()
        x = _expanded()
        base = x.clone()
        other = x4()
        other_before = other.clone()

        def act():
            fn(x, other, cos, sin)

        def post():
            return torch.equal(x, base) and torch.equal(other, other_before)
        return act, post
    return case


for _name, _fn, _arg in [
    ("op.apply_", lambda x, o, c, s: ops.apply_(x, c, s), "x"),
    ("apply_rope[inplace,bhsd]",
     lambda x, o, c, s: rope_ext.apply_rope(x.transpose(1, 2), c, s, layout="bhsd",
                                            inplace=True), "x"),
    ("op.apply_qk_[q]", lambda x, o, c, s: ops.apply_qk_(x, o, c, s), "q"),
    ("op.apply_qk_[k]", lambda x, o, c, s: ops.apply_qk_(o, x, c, s), "k"),
    ("apply_rope_qk[inplace,k]",
     lambda x, o, c, s: rope_ext.apply_rope_qk(o, x, c, s, inplace=True), "k"),
]:
    _n = f"inplace_zero_stride[{_name}]"
    ISOLATED[_n] = _inplace_overlap(_fn, _arg)
    EXPECT[_n] = ("ValueError", word(_arg))


@_isolated("inplace_overlapping_strides[op.apply_]", ("ValueError", word("x")))
def _case_as_strided():
    # Overlap without a zero stride: each token's vector starts 4 elements after the last one.
    cos, sin = table()
    buf = torch.randn(64)
    x = buf.as_strided((1, S, 1, D), (64, 4, D, 1))
    before = buf.clone()

    def act():
        ops.apply_(x, cos, sin)
    return act, lambda: torch.equal(buf, before)


@_isolated("inplace_q_is_k[op.apply_qk_]", ("ValueError", r"\bq\b.*\bk\b|\bk\b.*\bq\b"))
def _case_q_is_k():
    cos, sin = table()
    q = x4()
    before = q.clone()

    def act():
        ops.apply_qk_(q, q, cos, sin)
    return act, lambda: torch.equal(q, before)


@_isolated("inplace_q_is_k[apply_rope_qk]", ("ValueError", r"\bq\b.*\bk\b|\bk\b.*\bq\b"))
def _case_q_is_k_wrapper():
    cos, sin = table()
    q = x4()
    before = q.clone()

    def act():
        rope_ext.apply_rope_qk(q, q, cos, sin, arange_pos(), inplace=True)
    return act, lambda: torch.equal(q, before)


@_isolated("inplace_q_k_partial_overlap[op.apply_qk_]",
           ("ValueError", r"\bq\b.*\bk\b|\bk\b.*\bq\b"))
def _case_q_k_overlap():
    cos, sin = table()
    buf = torch.randn(B, S, H + 1, D)
    q, k = buf[:, :, :H], buf[:, :, 1:]
    before = buf.clone()

    def act():
        ops.apply_qk_(q, k, cos, sin)
    return act, lambda: torch.equal(buf, before)


@_isolated("inplace_fused_qkv_disjoint[op.apply_qk_]", None)
def _case_fused_qkv():
    # q and k sliced out of one fused qkv projection share storage but no element: a legitimate
    # in-place call that must not be refused, and must rotate each exactly once.
    cos, sin = table()
    qkv = torch.randn(B, S, 3 * H * D)
    q = qkv[..., :H * D].unflatten(-1, (H, D))
    k = qkv[..., H * D:2 * H * D].unflatten(-1, (H, D))
    v_before = qkv[..., 2 * H * D:].clone()
    eq, ek = reference(q, cos, sin), reference(k, cos, sin)

    def act():
        ops.apply_qk_(q, k, cos, sin)

    def post():
        return (torch.allclose(q, eq) and torch.allclose(k, ek)
                and torch.equal(qkv[..., 2 * H * D:], v_before))
    return act, post


@_isolated("inplace_fused_qkv_disjoint[apply_rope_qk,bhsd]", None)
def _case_fused_qkv_bhsd():
    cos, sin = table()
    qkv = torch.randn(B, 3 * H, S, D)
    q, k = qkv[:, :H], qkv[:, H:2 * H]
    eq = reference(q.transpose(1, 2), cos, sin).transpose(1, 2)
    ek = reference(k.transpose(1, 2), cos, sin).transpose(1, 2)

    def act():
        rope_ext.apply_rope_qk(q, k, cos, sin, layout="bhsd", inplace=True)

    def post():
        return torch.allclose(q, eq) and torch.allclose(k, ek)
    return act, post


@_isolated("functional_zero_stride_x", None)
def _case_functional_expand():
    cos, sin = table()
    x = _expanded()

    def act():
        act.out = ops.apply(x, cos, sin, arange_pos())
        act.qk = ops.apply_qk(x, x, cos, sin, arange_pos())

    def post():
        e = reference(x.contiguous(), cos, sin, arange_pos())
        return (torch.allclose(act.out, e) and torch.allclose(act.qk[0], e)
                and torch.allclose(act.qk[1], e))
    return act, post


@_isolated("functional_zero_stride_table", None)
def _case_functional_table_expand():
    cos0, sin0 = table()
    cos, sin = cos0[3:4].expand(P, PAIRS), sin0[3:4].expand(P, PAIRS)
    x = x4()

    def act():
        act.out = ops.apply(x, cos, sin, arange_pos())
        act.tok = ops.apply(x, cos0[3].expand(B, S, PAIRS), sin0[3].expand(B, S, PAIRS))

    def post():
        e = reference(x, cos.contiguous(), sin.contiguous(), arange_pos())
        return torch.allclose(act.out, e) and torch.allclose(act.tok, e)
    return act, post


@_isolated("backward_zero_stride_grad", None)
def _case_backward_sum():
    # The gradient of .sum() is an expanded (all-zero-stride) tensor fed to the op.
    cos, sin = table()
    x = x4().requires_grad_()

    def act():
        ops.apply(x, cos, sin, arange_pos()).sum().backward()

    def post():
        e = reference_inverse(torch.ones(B, S, H, D), cos, sin, arange_pos())
        return torch.allclose(x.grad, e)
    return act, post


def reference_inverse(x, cos, sin, positions=None):
    return reference(x, cos, -sin, positions)


def _run_isolated_cases():
    """Entry point of the child interpreter: one JSON line per case, flushed at once."""
    torch.manual_seed(0)
    for name, case in ISOLATED.items():
        rec = {"case": name, "exc": None, "msg": None, "post": None}
        try:
            act, post = case()
            try:
                act()
            except Exception as e:  # noqa: BLE001 - reported to the parent
                rec["exc"], rec["msg"] = type(e).__name__, str(e)
            rec["post"] = bool(post())
        except Exception as e:  # noqa: BLE001
            rec["exc"], rec["msg"] = "SETUP:" + type(e).__name__, str(e)
        print(json.dumps(rec), flush=True)
    print(json.dumps({"case": "__done__"}), flush=True)


_CHILD = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("_rope_test_errors_child", {path!r})
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
mod._run_isolated_cases()
"""


@pytest.fixture(scope="module")
def isolated():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE)] +
                                        [p for p in [env.get("PYTHONPATH")] if p])
    code = _CHILD.format(path=str(Path(__file__).resolve()))
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), env=env,
                              capture_output=True, text=True, timeout=300)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:  # a hang: report what finished before it
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc, err = "timeout", "timed out after 300 s"
    results = {}
    for line in out.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        results[rec["case"]] = rec
    return rc, results, err


def test_isolated_child_exits_cleanly(isolated):
    rc, results, err = isolated
    assert rc == 0 and "__done__" in results, f"child exit {rc}; stderr tail:\n{err[-3000:]}"


@pytest.mark.parametrize("name", list(ISOLATED))
def test_isolated(isolated, name):
    rc, results, err = isolated
    rec = results.get(name)
    assert rec is not None, (f"the child interpreter died before reporting this case "
                             f"(exit {rc}); stderr tail:\n{err[-3000:]}")
    assert not (rec["exc"] or "").startswith("SETUP:"), rec
    expect = EXPECT[name]
    if expect is None:
        assert rec["exc"] is None, f"raised {rec['exc']}: {rec['msg']}"
        assert rec["post"], "accepted, but the result is wrong"
    else:
        exc, pattern = expect
        assert rec["exc"] == exc, f"expected {exc}, got {rec['exc']}: {rec['msg']}"
        assert re.search(pattern, rec["msg"]), rec["msg"]
        assert rec["post"], "rejected, but memory was written before the rejection"


def test_import_error_names_the_torch_built_for_and_the_one_found(tmp_path):
    # A library that cannot load (here: not there at all) stands for a binary built for
    # another torch; the message must say which torch each side has.
    import subprocess
    import sys

    from rope_ext._build_info import TORCH_VERSION

    env = dict(os.environ, ROPE_EXT_LIBRARY=str(tmp_path / "missing_C.so"))
    run = subprocess.run([sys.executable, "-c", "import rope_ext"], env=env, capture_output=True,
                         text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode != 0
    assert "ImportError" in run.stderr
    assert f"built against torch {TORCH_VERSION}" in run.stderr, run.stderr[-2000:]
    assert f"this environment has torch {torch.__version__}" in run.stderr, run.stderr[-2000:]


def test_import_refuses_another_torch_release():
    # A binary can load beside another torch release and fail later, inside any call: the
    # import compares the releases (major.minor) first.
    import subprocess
    import sys

    code = "import torch; torch.__version__ = '1.0.0'; import rope_ext"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode != 0
    assert "ImportError" in run.stderr and "this environment has torch 1.0.0" in run.stderr, \
        run.stderr[-2000:]


def _loaded_library():
    import rope_ext._ops as ops_module

    if ops_module._library:
        return ops_module._library
    from rope_ext import _C

    return _C.__file__


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("readelf") is None
                    or shutil.which("nm") is None, reason="reads the ELF library with binutils")
def test_library_imports_the_shared_libstdcxx():
    # A static copy of libstdc++ inside the library disagrees with torch's copy on locale
    # state: the first number an error message formats crashes the process (seen on the GPU
    # machine's image). The library must import libstdc++.so.6 and define none of it.
    library = _loaded_library()
    dynamic = subprocess.run(["readelf", "-d", library], capture_output=True, text=True).stdout
    assert "[libstdc++.so.6]" in dynamic, dynamic
    defined = subprocess.run(["nm", "-D", "--defined-only", library], capture_output=True,
                             text=True).stdout
    locale = [line for line in defined.splitlines() if "_ZNSt6locale" in line]
    assert not locale, locale[:5]
