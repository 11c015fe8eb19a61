"""rope_frequencies for every rope_type against transformers' own functions
(docs/math.md section 9).

transformers builds inv_freq in float32; ours is float64. They agree to the rounding
transformers' float32 arithmetic loses (reference.assert_inv_freq_matches spells it out; the
one comparison, which tests/test_hf_models.py uses too).

Attention factors are Python floats in both, computed by the same formulas: they agree to
1e-12. The worked numbers of docs/math.md section 9 are checked independently of transformers.
proportional's zero-frequency pairs must match transformers' exactly (a relative error is
undefined there). Per-layer configs (Gemma 4) are in tests/test_scaling_layers.py.
"""

import math

import pytest
import torch
import transformers  # only the tests use it: rope_ext never imports it
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import rope_ext
from reference import assert_inv_freq_matches, hf_inv_freq_rel_bound
from rope_ext.scaling import default_inv_freq, dynamic_inv_freq, longrope_inv_freq

transformers.logging.set_verbosity_error()  # validation warnings about our unusual test keys

# ---------------------------------------------------------------------------------------------
# transformers side
# ---------------------------------------------------------------------------------------------


def hf_config(head_dim, max_position_embeddings, rope_parameters, partial_rotary_factor=None,
              legacy=False):
    """A LlamaConfig holding `rope_parameters` (as the old `rope_scaling` kwarg when `legacy`)."""
    kwargs = {}
    if partial_rotary_factor is not None:
        kwargs["partial_rotary_factor"] = partial_rotary_factor
    rope_key = "rope_scaling" if legacy else "rope_parameters"
    kwargs[rope_key] = dict(rope_parameters)
    return transformers.LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2,
                                    head_dim=head_dim,
                                    max_position_embeddings=max_position_embeddings, **kwargs)


def hf_frequencies(config, seq_len=None):
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":  # not in ROPE_INIT_FUNCTIONS: each model's rotary module has it
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=seq_len)


def assert_factor(ours, theirs):
    assert isinstance(ours, float)
    assert math.isclose(ours, theirs, rel_tol=1e-12), (ours, theirs)


def ours_of(params, r):
    """Our rope_frequencies for a transformers-style dict (rope_theta is our `base`)."""
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    return rope_ext.rope_frequencies(r, params["rope_theta"], scaling)


# Phi-3-mini-128k-like longrope lists: 48 entries (r 96), short near 1..2.5, long larger.
PHI3_SHORT = [round(1.0 + 1.5 * (i / 47) ** 2, 6) for i in range(48)]
PHI3_LONG = [round(1.0 + 0.8 * i + 0.01 * i * i, 4) for i in range(48)]
PHI4_SHORT = [round(1.0 + 0.03 * i, 5) for i in range(48)]
PHI4_LONG = [round(1.05 * 1.09**i, 5) for i in range(48)]

# (id, head_dim, max_position_embeddings, partial_rotary_factor, rope_parameters, legacy key)
CASES = [
    # linear
    ("linear", 128, 4096, None,
     {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}, False),
    ("linear-partial-legacy", 128, 4096, 0.5,
     {"type": "linear", "rope_theta": 10000.0, "factor": 2.0}, True),
    ("linear-gemma3-global", 256, 131072, None,
     {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0}, False),
    ("linear-r96", 96, 4096, None,
     {"rope_type": "linear", "rope_theta": 10000.0, "factor": 3.0}, False),
    # dynamic (static: the init table)
    ("dynamic", 128, 4096, None,
     {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, False),
    ("dynamic-partial-legacy", 96, 2048, 0.25,
     {"type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}, True),
    # yarn
    ("yarn-spec-example", 128, 16384, None,
     {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
      "original_max_position_embeddings": 4096}, False),
    ("yarn-qwen2", 128, 131072, None,
     {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
      "original_max_position_embeddings": 32768}, False),
    ("yarn-deepseek-v2-lite", 64, 163840, None,
     {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
      "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
      "mscale": 0.707, "mscale_all_dim": 0.707}, False),
    ("yarn-deepseek-v3-like", 64, 163840, None,
     {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
      "original_max_position_embeddings": 4096, "mscale": 1.0, "mscale_all_dim": 0.5}, False),
    ("yarn-lone-mscale", 64, 163840, None,
     {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
      "original_max_position_embeddings": 4096, "mscale": 0.707}, False),
    ("yarn-attention-factor", 128, 32768, None,
     {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
      "original_max_position_embeddings": 4096, "attention_factor": 1.25}, False),
    ("yarn-betas", 128, 32768, None,
     {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0,
      "original_max_position_embeddings": 4096, "beta_fast": 16, "beta_slow": 2}, False),
    ("yarn-beta-zero-is-default", 128, 32768, None,
     {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
      "original_max_position_embeddings": 4096, "beta_fast": 0, "beta_slow": 0}, False),
    ("yarn-no-truncate-r96", 96, 16384, None,
     {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
      "original_max_position_embeddings": 4096, "truncate": False}, False),
    ("yarn-partial-legacy", 128, 8192, 0.5,
     {"type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
      "original_max_position_embeddings": 4096}, True),
    ("yarn-lo-equals-hi", 64, 64, None,   # orig < 2 pi: both ends clamp to 0, hi += 0.001
     {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 16.0,
      "original_max_position_embeddings": 6}, False),
    ("yarn-factor-below-1", 128, 4096, None,
     {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 0.5,
      "original_max_position_embeddings": 4096}, False),
    # longrope (static: the short table)
    ("longrope-phi3-mini", 96, 131072, None,
     {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": PHI3_SHORT,
      "long_factor": PHI3_LONG, "original_max_position_embeddings": 4096, "factor": 32.0}, False),
    ("longrope-phi4-mini-partial", 128, 131072, 0.75,
     {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": PHI4_SHORT,
      "long_factor": PHI4_LONG, "original_max_position_embeddings": 4096, "factor": 32.0}, False),
    ("longrope-attention-factor-legacy", 96, 131072, None,
     {"type": "longrope", "rope_theta": 10000.0, "short_factor": PHI3_SHORT,
      "long_factor": PHI3_LONG, "original_max_position_embeddings": 4096,
      "attention_factor": 1.1}, True),
    ("longrope-factor-1", 96, 4096, None,
     {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": PHI3_SHORT,
      "long_factor": PHI3_LONG, "original_max_position_embeddings": 4096, "factor": 1.0}, False),
    # llama3
    ("llama3-llama3.1-8b", 128, 131072, None,
     {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, False),
    ("llama3-llama3.2-1b", 64, 131072, None,
     {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, False),
    ("llama3-r96-base1e4", 96, 65536, None,
     {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, False),
    ("llama3-partial-legacy", 128, 32768, 0.5,
     {"type": "llama3", "rope_theta": 500000.0, "factor": 4.0, "low_freq_factor": 2.0,
      "high_freq_factor": 8.0, "original_max_position_embeddings": 4096}, True),
] + [  # default (no scaling)
    (f"default-d{head_dim}-base{base:g}", head_dim, 4096, None,
     {"rope_type": "default", "rope_theta": base}, False)
    for head_dim, base in [(128, 10000.0), (128, 500000.0), (96, 10000.0), (256, 1e6),
                           (64, 10000.0)]
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_transformers(case):
    _, head_dim, max_pos, prf, params, legacy = case
    r = int(head_dim * (prf or 1.0))
    theirs, their_factor = hf_frequencies(hf_config(head_dim, max_pos, params, prf, legacy))
    ours, our_factor = ours_of(params, r)
    assert_inv_freq_matches(ours, theirs, params["rope_theta"], r)
    assert_factor(our_factor, their_factor)
    if params.get("rope_type") == "default":  # the other ways to say it give the same table
        for scaling in (None, {"type": "default"}, {}):
            inv, factor = rope_ext.rope_frequencies(r, params["rope_theta"], scaling)
            assert torch.equal(inv, ours) and factor == our_factor, scaling


def test_the_comparison_is_tight():
    # The tolerance must reject a 10-ulp error and an untruncated ramp (ends moved < 1 pair).
    params = CASES[7][4]  # yarn-qwen2
    theirs, _ = hf_frequencies(hf_config(128, 131072, params))
    ours, _ = ours_of(params, 128)
    with pytest.raises(AssertionError):
        assert_inv_freq_matches(ours * (1 + 10 * 2.0**-24), theirs, 1e6, 128)
    shifted, _ = ours_of(dict(params, truncate=False), 128)   # ramp 23.60..39.65, not 23..40
    with pytest.raises(AssertionError):
        assert_inv_freq_matches(shifted, theirs, 1e6, 128)


# ---------------------------------------------------------------------------------------------
# proportional (Gemma 4's full-attention layers): a table over the whole head whose last pairs
# have frequency 0. The zeros must match exactly; the rotated pairs as for the other types.
# ---------------------------------------------------------------------------------------------


def proportional_reference(head_dim, base, factor, rotated):
    """float64: base ** (-2i / head_dim) / factor for the first `rotated` pairs, then zeros."""
    out = [base ** (-2 * i / head_dim) / factor if i < rotated else 0.0
           for i in range(head_dim // 2)]
    return torch.tensor(out, dtype=torch.float64)


def assert_proportional_matches(ours, theirs, base, head_dim):
    """transformers' zero pairs exactly, its rotated pairs to its float32 rounding."""
    assert ours.dtype == torch.float64 and theirs.dtype == torch.float32
    assert ours.shape == theirs.shape == (head_dim // 2,)
    rotated = int((theirs != 0).sum())
    assert torch.equal(theirs[rotated:], torch.zeros(head_dim // 2 - rotated))  # a zero tail
    assert torch.equal(ours[rotated:], torch.zeros(head_dim // 2 - rotated, dtype=torch.float64))
    rel = ((ours[:rotated] - theirs[:rotated].double()) / theirs[:rotated].double()).abs()
    bound = hf_inv_freq_rel_bound(base, head_dim)[:rotated]
    assert (rel <= bound).all(), (rel - bound).max().item()
    return rotated


# (id, head_dim, rope_theta, factor or None (absent), partial_rotary_factor or None (absent),
#  partial factor given at the config's top level instead of in the dict)
PROPORTIONAL = [
    ("gemma4-full", 512, 1e6, None, 0.25, False),
    ("factor-8-d256", 256, 1e6, 8.0, 0.25, False),
    ("half-d128", 128, 10000.0, 1.0, 0.5, False),
    ("r96-factor2", 96, 10000.0, 2.0, 0.75, False),          # 2i / 96 is inexact in float32
    ("fraction-absent", 64, 500000.0, 4.0, None, False),     # default 1: every pair rotates
    ("fraction-1", 64, 10000.0, None, 1.0, False),
    ("fraction-0", 64, 10000.0, None, 0.0, False),           # no pair rotates
    ("floor-0.1-d64", 64, 10000.0, None, 0.1, False),        # 6.4 // 2: 3 pairs
    ("floor-0.3-d80", 80, 10000.0, 1.5, 0.3, False),         # 24.000000000000004 // 2: 12
    ("floor-0.33-d100", 100, 10000.0, None, 0.33, False),    # 33.0 // 2: 16
    ("top-level-fraction", 256, 1e6, 2.0, 0.25, True),
]


@pytest.mark.parametrize("case", PROPORTIONAL, ids=[c[0] for c in PROPORTIONAL])
def test_proportional_matches_transformers(case):
    _, head_dim, base, factor, fraction, top_level = case
    params = {"rope_type": "proportional", "rope_theta": base}
    scaling = {"rope_type": "proportional"}
    if factor is not None:
        params["factor"] = scaling["factor"] = factor
    if fraction is not None:
        scaling["partial_rotary_factor"] = fraction
        if not top_level:
            params["partial_rotary_factor"] = fraction
    config = hf_config(head_dim, 8192, params, fraction if top_level else None)
    theirs, their_factor = ROPE_INIT_FUNCTIONS["proportional"](config, "cpu")
    # r is the whole head: the partial factor is a scaling key, not a smaller rotary dim.
    ours, our_factor = rope_ext.rope_frequencies(head_dim, base, scaling)
    rotated = assert_proportional_matches(ours, theirs, base, head_dim)
    assert rotated == int((1.0 if fraction is None else fraction) * head_dim // 2)
    assert_factor(our_factor, their_factor)
    assert our_factor == 1.0
    reference = proportional_reference(head_dim, base, factor or 1.0, rotated)
    torch.testing.assert_close(ours, reference, rtol=4e-16, atol=0)


def test_proportional_comparison_is_tight():
    # One pair too many or too few, and a 10-ulp error, must fail the comparison.
    config = hf_config(256, 8192, {"rope_type": "proportional", "rope_theta": 1e6,
                                   "partial_rotary_factor": 0.25})
    theirs, _ = ROPE_INIT_FUNCTIONS["proportional"](config, "cpu")
    for wrong in (proportional_reference(256, 1e6, 1.0, 31),
                  proportional_reference(256, 1e6, 1.0, 33),
                  proportional_reference(256, 1e6, 1.0, 32) * (1 + 10 * 2.0**-24)):
        with pytest.raises(AssertionError):
            assert_proportional_matches(wrong, theirs, 1e6, 256)


def test_documented_proportional():
    # docs/math.md section 9.8: Gemma 4's full-attention layers, head_dim 512, base 1e6,
    # fraction 0.25: pairs 0..63 of 256 rotate; pair 63 at 1e6 ** (-126 / 512).
    inv, factor = rope_ext.rope_frequencies(
        512, 1e6, {"rope_type": "proportional", "partial_rotary_factor": 0.25})
    assert factor == 1.0 and inv.shape == (256,)
    assert bool((inv[:64] > 0).all()) and bool((inv[64:] == 0).all())
    assert inv[1].item() == pytest.approx(0.94746353, rel=1e-8)
    assert inv[63].item() == pytest.approx(3.3376247e-2, rel=1e-7)
    # Not a partial rotary over 128 dims: that divides the exponent by 128, not 512.
    assert inv[1].item() != pytest.approx(1e6 ** (-2 / 128), rel=1e-3)


# ---------------------------------------------------------------------------------------------
# Where transformers takes the factor from the config's lengths: our "max_position_embeddings"
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_pos", [16384, 131072])
def test_yarn_factor_from_lengths(max_pos):
    # transformers reads rope_parameters["factor"] and, when it is None, uses the config's
    # max_position_embeddings / original_max_position_embeddings.
    params = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": None,
              "original_max_position_embeddings": 4096}
    theirs, their_factor = hf_frequencies(hf_config(128, max_pos, params))
    scaling = {"rope_type": "yarn", "original_max_position_embeddings": 4096,
               "max_position_embeddings": max_pos}
    ours, our_factor = rope_ext.rope_frequencies(128, 10000.0, scaling)
    assert_inv_freq_matches(ours, theirs, 10000.0, 128)
    assert_factor(our_factor, their_factor)
    explicit = rope_ext.rope_frequencies(128, 10000.0, dict(scaling, factor=max_pos / 4096))
    assert torch.equal(ours, explicit[0]) and our_factor == explicit[1]


@pytest.mark.parametrize("head_dim,prf", [(96, None), (128, 0.75)])
def test_longrope_factor_from_lengths(head_dim, prf):
    # Phi-3 configs carry no factor: the attention factor comes from 131072 / 4096 = 32.
    short, long = (PHI3_SHORT, PHI3_LONG) if prf is None else (PHI4_SHORT, PHI4_LONG)
    params = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short,
              "long_factor": long, "original_max_position_embeddings": 4096}
    theirs, their_factor = hf_frequencies(hf_config(head_dim, 131072, params, prf))
    r = int(head_dim * (prf or 1.0))
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    ours, our_factor = rope_ext.rope_frequencies(r, 10000.0,
                                                 dict(scaling, max_position_embeddings=131072))
    assert_inv_freq_matches(ours, theirs, 10000.0, r)
    assert_factor(our_factor, their_factor)
    assert our_factor == pytest.approx(1.1902381, abs=5e-8)
    # Without either length the dict says nothing about extension: factor 1, A = 1.
    plain, plain_factor = rope_ext.rope_frequencies(r, 10000.0, scaling)
    assert torch.equal(plain, ours) and plain_factor == 1.0


def test_longrope_phi3_config_top_level_original():
    # Phi3Config keeps original_max_position_embeddings at the top level and copies it in.
    config = transformers.Phi3Config(
        hidden_size=3072, num_attention_heads=32, max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "short_factor": PHI3_SHORT, "long_factor": PHI3_LONG})
    assert config.rope_parameters["original_max_position_embeddings"] == 4096
    theirs, their_factor = hf_frequencies(config)
    scaling = {"rope_type": "longrope", "short_factor": PHI3_SHORT, "long_factor": PHI3_LONG,
               "original_max_position_embeddings": 4096, "max_position_embeddings": 131072}
    ours, our_factor = rope_ext.rope_frequencies(96, 10000.0, scaling)
    assert_inv_freq_matches(ours, theirs, 10000.0, 96)
    assert_factor(our_factor, their_factor)


# ---------------------------------------------------------------------------------------------
# Run-time tables: dynamic_inv_freq and longrope_inv_freq against transformers with seq_len
# ---------------------------------------------------------------------------------------------


def ntk_base(base, factor, length, seq_len, r):
    s = max(seq_len, length)
    return base * (factor * s / length - (factor - 1)) ** (r / (r - 2))


@pytest.mark.parametrize("head_dim,prf,base,factor,max_pos", [
    (128, None, 10000.0, 2.0, 4096),
    (128, None, 1e6, 4.0, 32768),
    (96, None, 10000.0, 8.0, 2048),
    (128, 0.25, 10000.0, 2.0, 2048),     # GPT-NeoX-style partial rotary, r 32
    (64, None, 500000.0, 1.5, 8192),
])
@pytest.mark.parametrize("seq_frac", [0.0, 0.5, 1.0, "L+1", 1.5, 2.0, 10.0, 64.0])
def test_dynamic_matches_transformers(head_dim, prf, base, factor, max_pos, seq_frac):
    seq_len = max_pos + 1 if seq_frac == "L+1" else int(seq_frac * max_pos)
    r = int(head_dim * (prf or 1.0))
    params = {"rope_type": "dynamic", "rope_theta": base, "factor": factor}
    theirs, their_factor = hf_frequencies(hf_config(head_dim, max_pos, params, prf),
                                          seq_len=seq_len)
    ours = dynamic_inv_freq(r, base, factor, max_pos, seq_len)
    assert_inv_freq_matches(ours, theirs, ntk_base(base, factor, max_pos, seq_len, r), r)
    assert their_factor == 1.0
    if seq_len <= max_pos:
        # Up to L the table is the default one, and so is the static (init) table.
        assert torch.equal(ours, default_inv_freq(r, base))
    assert torch.equal(rope_ext.rope_frequencies(r, base, params)[0], default_inv_freq(r, base))


@pytest.mark.parametrize("head_dim,prf,short,long", [(96, None, PHI3_SHORT, PHI3_LONG),
                                                     (128, 0.75, PHI4_SHORT, PHI4_LONG)])
@pytest.mark.parametrize("seq_len", [None, 1, 4096, 4097, 131072])
def test_longrope_tables_match_transformers(head_dim, prf, short, long, seq_len):
    params = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short,
              "long_factor": long, "original_max_position_embeddings": 4096, "factor": 32.0}
    r = int(head_dim * (prf or 1.0))
    theirs, their_factor = hf_frequencies(hf_config(head_dim, 131072, params, prf),
                                          seq_len=seq_len)
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    is_long = seq_len is not None and seq_len > 4096
    ours = longrope_inv_freq(r, 10000.0, scaling, long=is_long)
    assert_inv_freq_matches(ours, theirs, 10000.0, r)
    # The attention factor is fixed at init, whatever the table.
    assert_factor(rope_ext.rope_frequencies(r, 10000.0, scaling)[1], their_factor)
    # The static table is the short one.
    short_table = rope_ext.rope_frequencies(r, 10000.0, scaling)[0]
    assert torch.equal(short_table, longrope_inv_freq(r, 10000.0, scaling, long=False))
    if is_long:
        assert not torch.equal(ours, short_table)
    else:
        assert torch.equal(ours, short_table)


# ---------------------------------------------------------------------------------------------
# The worked numbers of docs/math.md section 9, independent of transformers
# ---------------------------------------------------------------------------------------------


def test_documented_dynamic_base():
    inv = dynamic_inv_freq(128, 10000.0, 2.0, 4096, 8192)
    new_base = inv[1].item() ** (-64)   # theta_1 = base' ** (-2 / 128)
    assert new_base == pytest.approx(30527.74, abs=0.01)
    i = torch.arange(64, dtype=torch.float64)
    # 30527.74 is rounded to 1.6e-7 relative, and k = 2i/r <= 1.
    torch.testing.assert_close(inv, 30527.74 ** (-2 * i / 128), rtol=2e-7, atol=0)
    # s below L is raised to L: the default table.
    assert torch.equal(dynamic_inv_freq(128, 10000.0, 2.0, 4096, 100), default_inv_freq(128, 1e4))


@pytest.mark.parametrize("r,base,orig,lo,hi", [(128, 1e4, 4096, 20, 46), (64, 1e4, 4096, 10, 23),
                                               (128, 1e6, 32768, 23, 40)])
def test_documented_yarn_ramp(r, base, orig, lo, hi):
    factor = 4.0
    scaling = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": orig}
    inv, _ = rope_ext.rope_frequencies(r, base, scaling)
    ratio = inv / default_inv_freq(r, base)   # 1: extrapolated, 1/f: interpolated
    for i in range(r // 2):
        g = min(max((i - lo) / (hi - lo), 0.0), 1.0)
        assert ratio[i].item() == pytest.approx(1 - g + g / factor, rel=1e-13), i
    assert ratio[lo].item() == pytest.approx(1.0, rel=1e-15)
    assert ratio[lo + 1].item() < 1.0
    if hi < r // 2:
        assert ratio[hi - 1].item() > 1 / factor
        assert ratio[hi].item() == pytest.approx(1 / factor, rel=1e-15)


@pytest.mark.parametrize("extra,expected", [({"factor": 4.0}, 1.1386294),
                                            ({"factor": 40.0}, 1.3688879),
                                            ({"factor": 40.0, "mscale": 0.707}, 1.3688879),
                                            ({"factor": 1.0}, 1.0),
                                            ({"factor": 4.0, "attention_factor": 0.9}, 0.9)])
def test_documented_yarn_attention_factor(extra, expected):
    scaling = dict({"rope_type": "yarn", "original_max_position_embeddings": 4096}, **extra)
    assert rope_ext.rope_frequencies(64, 10000.0, scaling)[1] == pytest.approx(expected, abs=5e-8)


@pytest.mark.parametrize("mscale", [0.707, 1.0, 2.5])
def test_documented_yarn_equal_mscales_give_exactly_one(mscale):
    scaling = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
               "mscale": mscale, "mscale_all_dim": mscale}
    assert rope_ext.rope_frequencies(64, 10000.0, scaling)[1] == 1.0


def test_documented_llama3_bands():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    inv, factor = rope_ext.rope_frequencies(128, 500000.0, scaling)
    theta = default_inv_freq(128, 500000.0)
    assert factor == 1.0
    assert torch.equal(inv[:29], theta[:29])                # pairs 0..28 unchanged
    assert torch.equal(inv[35:], theta[35:] / 8)            # pairs 35..63 divided by 8
    smoothed = inv[29:35] / theta[29:35]
    assert ((smoothed > 1 / 8) & (smoothed < 1)).all()      # pairs 29..34 in between
    assert inv[30].item() == pytest.approx(1.3718936e-3, rel=5e-8)
    sm = (8192 * theta[30].item() / (2 * math.pi) - 1) / 3
    assert sm == pytest.approx(0.59285, abs=5e-6)


def test_documented_longrope():
    scaling = {"rope_type": "longrope", "short_factor": PHI3_SHORT, "long_factor": PHI3_LONG,
               "original_max_position_embeddings": 4096, "factor": 32.0}
    inv, factor = rope_ext.rope_frequencies(96, 10000.0, scaling)
    assert factor == pytest.approx(1.1902381, abs=5e-8)
    theta = default_inv_freq(96, 10000.0)
    torch.testing.assert_close(inv, theta / torch.tensor(PHI3_SHORT, dtype=torch.float64),
                               rtol=1e-15, atol=0)
    torch.testing.assert_close(longrope_inv_freq(96, 10000.0, scaling, long=True),
                               theta / torch.tensor(PHI3_LONG, dtype=torch.float64),
                               rtol=1e-15, atol=0)


def test_legacy_type_key_and_precedence():
    yarn = {"factor": 4.0, "original_max_position_embeddings": 4096}
    a = rope_ext.rope_frequencies(64, 10000.0, dict(yarn, rope_type="yarn"))
    b = rope_ext.rope_frequencies(64, 10000.0, dict(yarn, type="yarn"))
    c = rope_ext.rope_frequencies(64, 10000.0, dict(yarn, rope_type="yarn", type="linear"))
    assert torch.equal(a[0], b[0]) and torch.equal(a[0], c[0]) and a[1] == b[1] == c[1]


# ---------------------------------------------------------------------------------------------
# Bad values the new types add (missing keys and bad factors: tests/test_errors.py)
# ---------------------------------------------------------------------------------------------


LONGROPE = {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
            "original_max_position_embeddings": 4096}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}


@pytest.mark.parametrize("scaling,key", [
    (dict(LONGROPE, short_factor=[1.0] * 3), "short_factor"),
    (dict(LONGROPE, long_factor=[2.0] * 5), "long_factor"),
    (dict(LONGROPE, long_factor=[2.0, 2.0, 0.0, 2.0]), "long_factor"),
    (dict(LONGROPE, short_factor=[1.0, float("nan"), 1.0, 1.0]), "short_factor"),
    (dict(LONGROPE, short_factor=["1"] * 4), "short_factor"),
    (dict(LONGROPE, short_factor=1.0), "short_factor"),
    (dict(LONGROPE, factor=-1.0), "factor"),
    (dict(LONGROPE, factor=-1.0, attention_factor=1.1), "factor"),
    (dict(LONGROPE, attention_factor=0.0), "attention_factor"),
    (dict(LLAMA3, low_freq_factor=4.0), "low_freq_factor"),
    (dict(LLAMA3, low_freq_factor=5.0), "low_freq_factor"),
    (dict(LLAMA3, high_freq_factor=float("inf")), "high_freq_factor"),
    (dict(LLAMA3, original_max_position_embeddings=0), "original_max_position_embeddings"),
    (dict(YARN, beta_fast=1, beta_slow=32), "beta_fast"),
    (dict(YARN, beta_slow=-1.0), "beta_slow"),
    (dict(YARN, truncate="yes"), "truncate"),
    (dict(YARN, attention_factor=-1.0), "attention_factor"),
    (dict(YARN, mscale=-100.0, mscale_all_dim=1.0), "mscale"),
    (dict(YARN, factor="4"), "factor"),
    ({"rope_type": "yarn", "original_max_position_embeddings": 4096,
      "max_position_embeddings": 0}, "max_position_embeddings"),
    ({"rope_type": "dynamic", "factor": float("inf")}, "factor"),
    ({"rope_type": "proportional", "partial_rotary_factor": 1.5}, "partial_rotary_factor"),
    ({"rope_type": "proportional", "partial_rotary_factor": -0.25}, "partial_rotary_factor"),
    ({"rope_type": "proportional", "partial_rotary_factor": float("nan")},
     "partial_rotary_factor"),
    ({"rope_type": "proportional", "partial_rotary_factor": "0.25"}, "partial_rotary_factor"),
    ({"rope_type": "proportional", "partial_rotary_factor": True}, "partial_rotary_factor"),
    ({"rope_type": "proportional", "factor": 0.0}, "factor"),
    ({"rope_type": "proportional", "factor": -2.0}, "factor"),
    ({"rope_type": "proportional", "factor": float("inf")}, "factor"),
    ({"rope_type": "proportional", "factor": "2"}, "factor"),
])
def test_bad_scaling_value(scaling, key):
    with pytest.raises(ValueError, match=f"'{key}'"):
        rope_ext.rope_frequencies(8, 10000.0, scaling)


def test_dynamic_needs_rotary_dim_4():
    with pytest.raises(ValueError, match="rotary_dim"):
        rope_ext.rope_frequencies(2, 10000.0, {"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="rotary_dim"):
        dynamic_inv_freq(2, 10000.0, 2.0, 4096, 8192)


@pytest.mark.parametrize("args,name,exc", [
    ((7, 10000.0, 2.0, 4096, 8192), "rotary_dim", ValueError),
    ((8.0, 10000.0, 2.0, 4096, 8192), "rotary_dim", TypeError),
    ((8, 1.0, 2.0, 4096, 8192), "base", ValueError),
    ((8, 10000.0, 0.0, 4096, 8192), "factor", ValueError),
    ((8, 10000.0, float("nan"), 4096, 8192), "factor", ValueError),
    ((8, 10000.0, 2.0, 0, 8192), "max_position_embeddings", ValueError),
    ((8, 10000.0, 2.0, 4096, -1), "seq_len", ValueError),
    ((8, 10000.0, 2.0, 4096, None), "seq_len", TypeError),
    ((8, 10000.0, 2.0, 4096, float("inf")), "seq_len", ValueError),
])
def test_dynamic_inv_freq_bad_args(args, name, exc):
    with pytest.raises(exc, match=name):
        dynamic_inv_freq(*args)


def test_longrope_inv_freq_bad_args():
    with pytest.raises(ValueError, match="rope_type"):
        longrope_inv_freq(8, 10000.0, YARN, long=True)
    with pytest.raises(ValueError, match="'long_factor'"):
        longrope_inv_freq(8, 10000.0, dict(LONGROPE, long_factor=[2.0]), long=True)
    with pytest.raises(ValueError, match="rotary_dim"):
        longrope_inv_freq(7, 10000.0, LONGROPE, long=False)
