"""Per-layer rope parameters (Gemma 4) in RotaryEmbedding.from_hf_config and
hf_config.rotary_settings, against transformers' own rotary modules (docs/math.md 9.8, 9.9).

Gemma 4's text configs hold one rope dict per layer type: sliding-attention layers with
default RoPE (base 1e4) on head_dim, full-attention layers with proportional RoPE (base 1e6,
partial factor 0.25) on their own head_dim (global_head_dim). For each layer type the module
from from_hf_config(config, layer_type=...) must hold

a) transformers' inv_freq buffer for that layer type (zero pairs exactly, the others to
   transformers' float32 rounding, as tests/test_scaling.py compares) and a float64 reference
   computed here from the formula;
b) cos/sin rows equal to the rotary module's own cos/sin at the same positions, and a rotation
   of q and k equal to the modeling file's apply_rotary_pos_emb, within the float32 bounds of
   tests/test_hf_models.py (angle error of transformers' float32 angle plus 16 units of 2**-24).

The same for the config as a plain dict (to_dict, and a config.json with global_head_dim),
for a multimodal config, for the two families built on Gemma 4's config, and the errors.
"""

import pytest
import torch
import transformers
from transformers.models.diffusion_gemma import modeling_diffusion_gemma
from transformers.models.gemma4 import modeling_gemma4
from transformers.models.gemma4_unified import modeling_gemma4_unified

import rope_ext
from reference import hf_inv_freq_rel_bound
from rope_ext import hf_config

transformers.logging.set_verbosity_error()

EPS32 = 2.0**-24
FLOAT32_SLACK = 16 * EPS32
LAYER_TYPES = ("sliding_attention", "full_attention")

# Families sharing Gemma 4's text config: (config class, rotary module, apply function, whether
# their "default" RoPE ignores partial_rotary_factor and spans the whole head).
FAMILIES = {
    "gemma4": (transformers.Gemma4TextConfig, modeling_gemma4.Gemma4TextRotaryEmbedding,
               modeling_gemma4.apply_rotary_pos_emb, True),
    "gemma4_unified": (transformers.Gemma4UnifiedTextConfig,
                       modeling_gemma4_unified.Gemma4UnifiedTextRotaryEmbedding,
                       modeling_gemma4_unified.apply_rotary_pos_emb, True),
    "diffusion_gemma": (transformers.DiffusionGemmaTextConfig,
                        modeling_diffusion_gemma.DiffusionGemmaTextRotaryEmbedding,
                        modeling_diffusion_gemma.apply_rotary_pos_emb, False),
}

HEAD_DIM, GLOBAL_HEAD_DIM = 32, 64

# (id, rope_parameters or None for the family's defaults, global_head_dim or None (absent:
# transformers' 512), expected per layer type: (head_dim, rotated pairs, base, factor) where
# rotated pairs is the count of non-zero frequencies; None for the sliding partial case,
# which depends on the family)
GEMMA4_CASES = [
    ("defaults", None, GLOBAL_HEAD_DIM,
     {"sliding_attention": (32, 16, 1e4, 1.0), "full_attention": (64, 8, 1e6, 1.0)}),
    ("defaults-global-512", None, None,
     {"sliding_attention": (32, 16, 1e4, 1.0), "full_attention": (512, 64, 1e6, 1.0)}),
    ("custom", {"sliding_attention": {"rope_type": "default", "rope_theta": 50000.0},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5,
                                   "rope_theta": 500000.0, "factor": 2.0}},
     GLOBAL_HEAD_DIM,
     {"sliding_attention": (32, 16, 5e4, 1.0), "full_attention": (64, 16, 5e5, 2.0)}),
    ("custom-fraction-0.1", {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                             "full_attention": {"rope_type": "proportional",
                                                "partial_rotary_factor": 0.1,
                                                "rope_theta": 1e6, "factor": 8.0}},
     128, {"sliding_attention": (32, 16, 1e4, 1.0), "full_attention": (128, 6, 1e6, 8.0)}),
    ("same-head-dims", None, HEAD_DIM,
     {"sliding_attention": (32, 16, 1e4, 1.0), "full_attention": (32, 4, 1e6, 1.0)}),
    ("sliding-partial", {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4,
                                               "partial_rotary_factor": 0.5},
                         "full_attention": {"rope_type": "proportional",
                                            "partial_rotary_factor": 0.25, "rope_theta": 1e6}},
     GLOBAL_HEAD_DIM, {"sliding_attention": None, "full_attention": (64, 8, 1e6, 1.0)}),
]


def gemma_text_config(family, rope_parameters, global_head_dim, max_positions=512):
    cls = FAMILIES[family][0]
    kwargs = dict(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=6,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=HEAD_DIM,
                  max_position_embeddings=max_positions)
    if rope_parameters is not None:
        kwargs["rope_parameters"] = rope_parameters
    if global_head_dim is not None:
        kwargs["global_head_dim"] = global_head_dim
    return cls(**kwargs)


def expected_layer(family, case, layer_type):
    """(head_dim, rotated pairs, base, factor) for a case's layer type in a family."""
    expected = case[3][layer_type]
    if expected is None:  # the sliding layers' default RoPE given a partial factor 0.5
        ignores_partial = FAMILIES[family][3]
        expected = (32, 16 if ignores_partial else 8, 1e4, 1.0)
    return expected


def reference_inv_freq(head_dim, rotated, base, factor, proportional):
    """float64 from the formula: proportional spans the head (exponents over head_dim, zeros
    after the rotated pairs); default RoPE over its 2 * rotated dims."""
    denominator = head_dim if proportional else 2 * rotated
    size = head_dim // 2 if proportional else rotated
    return torch.tensor([base ** (-2 * i / denominator) / factor if i < rotated else 0.0
                         for i in range(size)], dtype=torch.float64)


def assert_matches_hf_inv_freq(ours, theirs, base, r):
    """transformers' zero pairs exactly, the others to its float32 rounding (test_scaling)."""
    assert ours.dtype == torch.float64 and theirs.dtype == torch.float32
    assert ours.shape == theirs.shape == (r // 2,), (ours.shape, theirs.shape, r)
    zero = theirs == 0
    assert torch.equal(ours == 0, zero)
    ours_nz, theirs_nz = ours[~zero], theirs[~zero].double()
    rel = ((ours_nz - theirs_nz) / theirs_nz).abs()
    bound = hf_inv_freq_rel_bound(base, r)[~zero]
    assert (rel <= bound).all(), (rel - bound).max().item()


def angle_error_bound(theta, theta_err, m):
    """|transformers' float32 angle - the exact angle| (tests/test_hf_models.py)."""
    m = m.double()
    return m * theta_err + EPS32 * m * (theta + theta_err)


def positions(seq, hi, seed):
    gen = torch.Generator().manual_seed(seed)
    row1 = torch.randperm(hi - 1, generator=gen)[: seq - 1].sort().values
    return torch.stack([torch.arange(seq), torch.cat([row1, torch.tensor([hi - 1])])])


def check_against_module(family, config, layer_type, ours):
    """b) cos/sin and the rotation of q and k against the family's rotary module."""
    _, rotary_cls, apply_fn, _ = FAMILIES[family]
    hf = rotary_cls(config)
    theirs = getattr(hf, f"{layer_type}_inv_freq")
    assert ours.attention_factor == getattr(hf, f"{layer_type}_attention_scaling") == 1.0
    assert_matches_hf_inv_freq(ours.inv_freq, theirs, ours.base, ours.rotary_dim)

    pos = positions(24, ours.max_positions, seed=len(layer_type) + ours.rotary_dim)
    d, half = ours.head_dim, ours.rotary_dim // 2
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 2, 24, d, generator=gen)
    k = torch.randn(2, 1, 24, d, generator=gen)
    cos, sin = hf(q, pos, layer_type)                       # [2, 24, rotary_dim]
    assert cos.shape == (2, 24, ours.rotary_dim)
    delta = angle_error_bound(ours.inv_freq, (theirs.double() - ours.inv_freq).abs(),
                              pos[..., None])               # [2, 24, r/2]
    for table, hf_half in ((ours.cos, cos), (ours.sin, sin)):
        row = table[pos].double()
        for part in (hf_half[..., :half], hf_half[..., half:]):
            assert ((row - part.double()).abs() <= delta + FLOAT32_SLACK).all()
    # Zero-frequency pairs: cos 1 and sin 0 exactly, in both.
    zero = ours.inv_freq == 0
    assert bool((ours.cos[:, zero] == 1).all()) and bool((ours.sin[:, zero] == 0).all())
    assert bool((cos[..., :half][..., zero] == 1).all())
    assert bool((sin[..., :half][..., zero] == 0).all())

    q_ours, k_ours = ours(q, k, pos)
    r = ours.rotary_dim
    # transformers' apply rotates cos.size(-1) dims: a partial table is applied to x[..., :r].
    q_hf, k_hf = apply_fn(q[..., :r], cos, sin), apply_fn(k[..., :r], cos, sin)
    for o, t, x in ((q_ours, q_hf, q), (k_ours, k_hf, k)):
        oa, ob = o[..., :half].double(), o[..., half:r].double()
        ta, tb = t[..., :half].double(), t[..., half:r].double()
        rho = torch.hypot(x[..., :half].double(), x[..., half:r].double())
        err = torch.hypot(oa - ta, ob - tb)
        assert (err <= (delta[:, None] + FLOAT32_SLACK) * rho).all()
        assert torch.equal(o[..., r:], x[..., r:])
        # Zero-frequency pairs pass through unchanged.
        assert torch.equal(o[..., :half][..., zero], x[..., :half][..., zero])
        assert torch.equal(o[..., half:r][..., zero], x[..., half:r][..., zero])


# ---------------------------------------------------------------------------------------------
# a) and b): each layer type of each Gemma 4 config, as a config object
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
@pytest.mark.parametrize("case", GEMMA4_CASES, ids=[c[0] for c in GEMMA4_CASES])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_gemma4_layer_types(family, case, layer_type):
    config = gemma_text_config(family, case[1], case[2])
    head_dim, rotated, base, factor = expected_layer(family, case, layer_type)
    ours = rope_ext.RotaryEmbedding.from_hf_config(config, layout="bhsd", layer_type=layer_type)
    rope_type = config.rope_parameters[layer_type]["rope_type"]
    proportional = rope_type == "proportional"
    assert (ours.head_dim, ours.base) == (head_dim, base)
    # proportional: the table spans the head; default: 2 * rotated dims.
    assert ours.rotary_dim == (head_dim if proportional else 2 * rotated)
    assert ours.rope_type == rope_type
    torch.testing.assert_close(ours.inv_freq,
                               reference_inv_freq(head_dim, rotated, base, factor, proportional),
                               rtol=4e-16, atol=0)
    assert int((ours.inv_freq != 0).sum()) == rotated
    check_against_module(family, config, layer_type, ours)


# ---------------------------------------------------------------------------------------------
# The same config as a plain dict, a config.json and inside a multimodal config
# ---------------------------------------------------------------------------------------------


def same_module(a, b):
    return ((a.head_dim, a.rotary_dim, a.base, a.scaling, a.max_positions, a.attention_factor)
            == (b.head_dim, b.rotary_dim, b.base, b.scaling, b.max_positions, b.attention_factor)
            and torch.equal(a.inv_freq, b.inv_freq))


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
@pytest.mark.parametrize("case", GEMMA4_CASES, ids=[c[0] for c in GEMMA4_CASES])
def test_gemma4_dicts(case, layer_type):
    """A dict means what transformers makes of it: to_dict (with per_layer_config), a
    config.json (global_head_dim, no per_layer_config: transformers' 512 when absent) and a
    multimodal Gemma4Config's text_config, each rebuilt by transformers for the reference."""
    config = gemma_text_config("gemma4", case[1], case[2])
    as_dict = config.to_dict()
    assert "per_layer_config" in as_dict
    config_json = {k: v for k, v in as_dict.items() if k != "per_layer_config"}
    if case[2] is not None:
        config_json["global_head_dim"] = case[2]
    if case[1] is None:
        del config_json["rope_parameters"]  # transformers fills in Gemma 4's defaults
    for raw in (as_dict, config_json):
        rebuilt = transformers.Gemma4TextConfig(**raw)
        expected = rope_ext.RotaryEmbedding.from_hf_config(config, layer_type=layer_type)
        ours = rope_ext.RotaryEmbedding.from_hf_config(raw, layout="bhsd", layer_type=layer_type)
        assert same_module(ours, expected)
        check_against_module("gemma4", rebuilt, layer_type, ours)
    multimodal = transformers.Gemma4Config(text_config=config)
    for outer in (multimodal, {"model_type": "gemma4", "text_config": as_dict}):
        ours = rope_ext.RotaryEmbedding.from_hf_config(outer, layer_type=layer_type)
        assert same_module(ours, expected)


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
@pytest.mark.parametrize("case", GEMMA4_CASES, ids=[c[0] for c in GEMMA4_CASES])
def test_rotary_settings(case, layer_type):
    """hf_config.rotary_settings: rope_frequencies of its (rotary_dim, base, scaling) is the
    layer type's inv_freq in transformers."""
    config = gemma_text_config("gemma4", case[1], case[2])
    rotary_dim, base, scaling = hf_config.rotary_settings(config, layer_type)
    head_dim, rotated, expected_base, factor = expected_layer("gemma4", case, layer_type)
    assert base == expected_base and isinstance(base, float)
    inv_freq, attention_factor = rope_ext.rope_frequencies(rotary_dim, base, scaling)
    hf = modeling_gemma4.Gemma4TextRotaryEmbedding(config)
    assert_matches_hf_inv_freq(inv_freq, getattr(hf, f"{layer_type}_inv_freq"), base,
                               rotary_dim)
    assert attention_factor == getattr(hf, f"{layer_type}_attention_scaling")
    if layer_type == "full_attention":
        assert rotary_dim == head_dim
        assert scaling["rope_type"] == "proportional"
        assert "rope_theta" not in scaling
    else:
        assert scaling is None and rotary_dim == 2 * rotated
    assert hf_config.rotary_settings(config.to_dict(), layer_type) == (rotary_dim, base, scaling)


def test_gemma3_per_layer_and_flat_configs():
    """Gemma 3's per-layer dicts are picked the same way; a flat config ignores layer_type."""
    from transformers.models.gemma3 import modeling_gemma3 as m3

    cfg = transformers.Gemma3TextConfig(
        hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
        max_position_embeddings=512,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                            "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    hf = m3.Gemma3RotaryEmbedding(config=cfg)
    for layer_type in LAYER_TYPES:
        ours = rope_ext.RotaryEmbedding.from_hf_config(cfg, layer_type=layer_type)
        assert_matches_hf_inv_freq(ours.inv_freq, getattr(hf, f"{layer_type}_inv_freq"),
                                   ours.base, 64)
    llama = transformers.LlamaConfig(hidden_size=128, num_attention_heads=2, head_dim=64)
    flat = hf_config.rotary_settings(llama)
    assert hf_config.rotary_settings(llama, "full_attention") == flat == (64, 10000.0, None)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_dict", [False, True], ids=["config", "dict"])
@pytest.mark.parametrize("layer_type", [None, "local_attention", "Full_attention"])
def test_per_layer_config_needs_a_known_layer_type(as_dict, layer_type):
    config = gemma_text_config("gemma4", None, GLOBAL_HEAD_DIM)
    if as_dict:
        config = config.to_dict()
    for call in (lambda: rope_ext.RotaryEmbedding.from_hf_config(config, layer_type=layer_type),
                 lambda: hf_config.rotary_settings(config, layer_type)):
        with pytest.raises(ValueError, match="layer_type") as info:
            call()
        # The message names the available layer types.
        assert "'full_attention'" in str(info.value)
        assert "'sliding_attention'" in str(info.value)


def test_gemma3_needs_a_layer_type():
    cfg = transformers.Gemma3TextConfig(hidden_size=128, num_attention_heads=2, head_dim=64,
                                        num_key_value_heads=1)
    with pytest.raises(ValueError, match="'full_attention', 'sliding_attention'"):
        rope_ext.RotaryEmbedding.from_hf_config(cfg)


def test_layer_without_rope():
    raw = gemma_text_config("gemma4", None, GLOBAL_HEAD_DIM).to_dict()
    raw["rope_parameters"] = dict(raw["rope_parameters"], sliding_attention=None)
    with pytest.raises(ValueError, match="'sliding_attention'.*None"):
        hf_config.rotary_settings(raw, "sliding_attention")
    assert hf_config.rotary_settings(raw, "full_attention")[0] == GLOBAL_HEAD_DIM


def test_flat_config_with_undeclared_layer_type():
    # Gemma 2: one rope dict, layer_types declared: a layer type it does not have is a mistake.
    cfg = transformers.Gemma2Config(hidden_size=128, num_attention_heads=2, head_dim=64,
                                    num_key_value_heads=1, num_hidden_layers=2)
    assert hf_config.rotary_settings(cfg, "sliding_attention") == hf_config.rotary_settings(cfg)
    with pytest.raises(ValueError, match="'chunked_attention'.*'full_attention'"):
        hf_config.rotary_settings(cfg, "chunked_attention")


def test_layers_of_one_type_with_different_head_dims():
    raw = gemma_text_config("gemma4", None, GLOBAL_HEAD_DIM).to_dict()
    raw["layer_types"] = ["sliding_attention", "full_attention"] * 3
    raw["per_layer_config"] = {"1": {"head_dim": 64}, "3": {"head_dim": 64},
                               "5": {"head_dim": 128}}
    with pytest.raises(ValueError, match="'full_attention'.*per_layer_config"):
        hf_config.rotary_settings(raw, "full_attention")
    assert hf_config.rotary_settings(raw, "sliding_attention") == (HEAD_DIM, 10000.0, None)


def test_heterogeneous_head_dim_needs_a_layer_type():
    # One rope dict for all layers, but head_dim differs per layer: which head_dim is unknown.
    config = gemma_text_config("gemma4", {"rope_type": "default", "rope_theta": 1e4},
                               GLOBAL_HEAD_DIM)
    with pytest.raises(ValueError, match="head_dim.*layer_type"):
        hf_config.rotary_settings(config)
    assert hf_config.rotary_settings(config, "full_attention") == (GLOBAL_HEAD_DIM, 1e4, None)


def test_bad_layer_type_type():
    with pytest.raises(TypeError, match="layer_type"):
        hf_config.rotary_settings({"head_dim": 64}, 3)
