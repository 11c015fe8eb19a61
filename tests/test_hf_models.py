"""RotaryEmbedding.from_hf_config against transformers' own modules, one model family at a time.

For each family (small sizes, realistic head_dim; nothing is downloaded) the test builds the
family's config, transformers' rotary module for it and that modeling file's apply function,
used the way the family's attention code uses it (partial-rotary slicing included), then checks
(docs/math.md sections 7, 8, 9, 11, 13 and 14):

a) our inv_freq (float64) equals transformers' float32 inv_freq to its float32 rounding, and the
   attention factors agree;
b) q and k rotated by our module equal transformers' rotation, float32 and bf16, batch 2 with
   different positions per row;
c) dynamic NTK and LongRoPE follow the sequence the way transformers' modules do;
d) .to(torch.bfloat16) leaves our table float32 (and the rotation unchanged).

Tolerances (per rotated pair, scaled by the pair norm rho of the input and by the attention
factor A, docs/math.md section 13.5). transformers' angle is fl32(theta_hf * m), theta_hf its
float32 inv_freq (m < 2**24 is exact in float32), so it is off the exact angle theta * m by at most

    delta = m * |theta_hf - theta| + 2**-24 * m * theta_hf          (inv_freq rounding + product)

radians, and rotating a pair by an angle off by delta moves it by at most delta * rho. On top:
float32 outputs 16 * 2**-24 * rho (both tables rounded to float32, transformers' float32 cos/sin
evaluation, its three eager roundings, our kernel's 4 * 2**-24); bf16 outputs 4 * 2**-8 * rho
(docs/math.md section 13.5: transformers rounds cos, sin, both products and the sum to bf16).
The pass-through tail must be bit-identical. Positions stay below 4096 (6000 for LongRoPE's long
table), where delta is at most a few 1e-4 rad.
"""

import copy
import math
from dataclasses import dataclass
from typing import Callable, Optional

import types

import pytest
import torch
import transformers
from transformers.models.gemma import modeling_gemma
from transformers.models.gpt_neox import modeling_gpt_neox
from transformers.models.gptj import modeling_gptj
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.phi3 import modeling_phi3
from transformers.models.qwen2 import modeling_qwen2

import rope_ext
from reference import assert_inv_freq_matches, hf_inv_freq_rel_bound
from rope_ext.scaling import default_inv_freq, dynamic_inv_freq, longrope_inv_freq

try:  # Qwen2-VL (MRoPE): present in the pinned transformers, guarded for older ones
    from transformers.models.qwen2_vl import configuration_qwen2_vl, modeling_qwen2_vl
except ImportError:  # pragma: no cover
    modeling_qwen2_vl = None

transformers.logging.set_verbosity_error()

EPS32 = 2.0**-24
FLOAT32_SLACK = 16 * EPS32
BF16_SLACK = 4 * 2.0**-8


# ---------------------------------------------------------------------------------------------
# The families
# ---------------------------------------------------------------------------------------------


def _phi3_factors(n):
    """Short and long LongRoPE factor lists of n numbers, shaped like Phi-3's (short near 1,
    long growing to tens for the slow pairs)."""
    short = [1.0 + 0.01 * i for i in range(n)]
    long = [1.0 + 40.0 * (i / (n - 1)) ** 2 for i in range(n)]
    return short, long


def _phi3_config(head_dim, partial):
    heads = 2
    r = int(head_dim * (partial or 1.0))
    short, long = _phi3_factors(r // 2)
    kwargs = {} if partial is None else {"partial_rotary_factor": partial}
    return transformers.Phi3Config(
        hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=131072, original_max_position_embeddings=4096,
        rope_scaling={"rope_type": "longrope", "short_factor": short, "long_factor": long},
        **kwargs)


@dataclass
class Family:
    name: str
    make_config: Callable
    kind: str  # "llama": X_RotaryEmbedding + modeling.apply_rotary_pos_emb; "gptj"; "mrope"
    modeling: object = None
    rotary_cls: Optional[str] = None
    max_pos: int = 4096  # test positions lie in [min_pos, max_pos)
    min_pos: int = 0
    layout: str = "bhsd"  # how the family's attention holds q and k when it rotates them


FAMILIES = [
    Family("llama2", lambda: transformers.LlamaConfig(
        hidden_size=256, num_attention_heads=2, num_key_value_heads=2, head_dim=128,
        max_position_embeddings=4096, rope_theta=10000.0),
        "llama", modeling_llama, "LlamaRotaryEmbedding"),
    Family("llama3", lambda: transformers.LlamaConfig(
        hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=8192, rope_theta=500000.0),
        "llama", modeling_llama, "LlamaRotaryEmbedding"),
    Family("llama3.1", lambda: transformers.LlamaConfig(
        hidden_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
        max_position_embeddings=16384,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}),
        "llama", modeling_llama, "LlamaRotaryEmbedding"),
    Family("mistral", lambda: transformers.MistralConfig(
        hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=32768, rope_theta=10000.0),
        "llama", modeling_mistral, "MistralRotaryEmbedding"),
    Family("qwen2", lambda: transformers.Qwen2Config(
        hidden_size=256, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=32768, rope_theta=1e6),
        "llama", modeling_qwen2, "Qwen2RotaryEmbedding"),
    Family("qwen2-yarn", lambda: transformers.Qwen2Config(
        hidden_size=256, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=131072,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                         "original_max_position_embeddings": 32768}),
        "llama", modeling_qwen2, "Qwen2RotaryEmbedding"),
    Family("phi3-mini", lambda: _phi3_config(96, None),  # Phi-3-mini-128k: d = r = 96
           "llama", modeling_phi3, "Phi3RotaryEmbedding"),
    Family("phi3-mini-long", lambda: _phi3_config(96, None),  # positions beyond L0 = 4096
           "llama", modeling_phi3, "Phi3RotaryEmbedding", max_pos=6000, min_pos=4097),
    Family("phi4-mini", lambda: _phi3_config(128, 0.75),  # partial rotary: r 96 of d 128
           "llama", modeling_phi3, "Phi3RotaryEmbedding"),
    Family("phi4-mini-long", lambda: _phi3_config(128, 0.75),
           "llama", modeling_phi3, "Phi3RotaryEmbedding", max_pos=6000, min_pos=4097),
    Family("gpt-neox", lambda: transformers.GPTNeoXConfig(  # NeoX-20B shape: d 96, r 24
        hidden_size=192, num_attention_heads=2, intermediate_size=256, rotary_pct=0.25,
        rotary_emb_base=10000, max_position_embeddings=4096),
        "llama", modeling_gpt_neox, "GPTNeoXRotaryEmbedding"),
    Family("gpt-neox-base", lambda: transformers.GPTNeoXConfig(  # another base and pct
        hidden_size=256, num_attention_heads=2, intermediate_size=256, rotary_pct=0.5,
        rotary_emb_base=20000, max_position_embeddings=4096),
        "llama", modeling_gpt_neox, "GPTNeoXRotaryEmbedding"),
    Family("gpt-j", lambda: transformers.GPTJConfig(  # interleaved, r 64 of d 128
        n_embd=256, n_head=2, rotary_dim=64, n_positions=4096),
        "gptj", modeling_gptj, layout="bshd"),
    Family("gemma", lambda: transformers.GemmaConfig(
        hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=256,
        max_position_embeddings=8192),
        "llama", modeling_gemma, "GemmaRotaryEmbedding"),
]
if modeling_qwen2_vl is not None:
    FAMILIES.append(Family("qwen2-vl", lambda: configuration_qwen2_vl.Qwen2VLTextConfig(
        hidden_size=256, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
        "mrope", modeling_qwen2_vl, "Qwen2VLRotaryEmbedding"))

FAMILY_IDS = [f.name for f in FAMILIES]
BY_NAME = {f.name: f for f in FAMILIES}


def _heads(cfg):
    hq = cfg.num_attention_heads
    hk = getattr(cfg, "num_key_value_heads", None) or hq
    return hq, hk


def _head_dim(cfg):
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


# ---------------------------------------------------------------------------------------------
# transformers' side
# ---------------------------------------------------------------------------------------------


def hf_rotary(family, cfg):
    return getattr(family.modeling, family.rotary_cls)(config=cfg)


def gptj_attention(cfg):
    return modeling_gptj.GPTJAttention(cfg, layer_idx=0)


def hf_rotate(family, cfg, q, k, position_ids, module=None):
    """transformers' rotation of q and k, as the family's attention forward does it.

    q, k in the family's layout ([B, H, S, D], GPT-J [B, S, H, D]); position_ids [B, S]
    ([3, B, S] for MRoPE). `module`: the rotary module (GPT-J: the attention module) to reuse.
    """
    if family.kind == "gptj":
        attn = module if module is not None else gptj_attention(cfg)
        # GPTJAttention.forward, the rotary part, verbatim in effect:
        embed_positions = attn._get_embed_positions(position_ids)
        repeated = position_ids.unsqueeze(-1).repeat(1, 1, embed_positions.shape[-1])
        sincos = torch.gather(embed_positions, 1, repeated).to(k.dtype)
        sin, cos = torch.split(sincos, sincos.shape[-1] // 2, dim=-1)
        rd = attn.rotary_dim
        out = []
        for t in (q, k):
            rot = modeling_gptj.apply_rotary_pos_emb(t[:, :, :, :rd], sin, cos)
            out.append(torch.cat([rot, t[:, :, :, rd:]], dim=-1))
        return tuple(out)
    rot = module if module is not None else hf_rotary(family, cfg)
    # Qwen2-VL: transformers 5.x has no apply_multimodal_rotary_pos_emb any more; its rotary
    # module picks each pair's stream (mrope_section chunks) itself and returns [B, S, r]
    # tables for the plain apply_rotary_pos_emb, which is what Qwen2VLAttention calls.
    cos, sin = rot(q, position_ids)
    # Phi-3 and GPT-NeoX's apply_rotary_pos_emb slice q[..., :cos.shape[-1]] themselves.
    return family.modeling.apply_rotary_pos_emb(q, k, cos, sin)


def hf_inv_freq(family, cfg):
    """transformers' float32 inv_freq and attention factor (GPT-J: None, it keeps no inv_freq)."""
    if family.kind == "gptj":
        return None, 1.0
    rot = hf_rotary(family, cfg)
    return rot.inv_freq, rot.attention_scaling


# ---------------------------------------------------------------------------------------------
# Bounds and comparisons
# ---------------------------------------------------------------------------------------------


def hf_theta_error(family, module, theirs):
    """|theta_hf - theta| per pair: measured where transformers exposes inv_freq, else (GPT-J,
    whose float32 inv_freq lives inside create_sinusoidal_positions) its a-priori bound."""
    theta = module.inv_freq
    if theirs is not None:
        return (theirs.double() - theta).abs()
    return theta * hf_inv_freq_rel_bound(10000.0, module.rotary_dim)


def angle_error_bound(theta, theta_err, m):
    """Bound on |transformers' float32 angle - exact angle|: m [..., r/2 or 1] positions."""
    m = m.double()
    return m * theta_err + EPS32 * m * (theta + theta_err)


def pair_view(x, r, interleaved):
    """(a, b) components of the r/2 rotated pairs of x [..., d], float64."""
    x = x.double()
    if interleaved:
        return x[..., 0:r:2], x[..., 1:r:2]
    return x[..., : r // 2], x[..., r // 2 : r]


def assert_rotation_close(ours, theirs, x, r, interleaved, tol):
    """Per pair |ours - theirs| <= tol * rho(x); tail bit-identical to x. All [B, S, H, D];
    tol broadcasts to [B, S, 1, r/2]."""
    assert ours.shape == theirs.shape == x.shape
    assert ours.dtype == theirs.dtype == x.dtype
    oa, ob = pair_view(ours, r, interleaved)
    ta, tb = pair_view(theirs, r, interleaved)
    xa, xb = pair_view(x, r, interleaved)
    err = torch.hypot(oa - ta, ob - tb)
    bound = tol * torch.hypot(xa, xb)
    ratio = err / bound.clamp_min(1e-300)
    worst = tuple(int(i) for i in torch.unravel_index(ratio.argmax(), ratio.shape))
    assert (err <= bound).all(), (
        f"pair at [b, s, h, i] = {worst}: |ours - transformers| = {err[worst].item():.3e} > "
        f"bound {bound[worst].item():.3e} ({ratio[worst].item():.2f} x)")
    assert torch.equal(ours[..., r:], x[..., r:]), "ours changed the pass-through tail"
    assert torch.equal(theirs[..., r:], x[..., r:])


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def batch_positions(seq, lo, hi, gen):
    """[2, seq] positions: row 0 consecutive from lo (a prefill), row 1 increasing, scattered
    over [lo, hi) and ending at hi - 1 (a sequence deep into the context)."""
    row0 = torch.arange(lo, lo + seq)
    row1 = torch.randperm(hi - lo - 1, generator=gen)[: seq - 1].sort().values + lo
    row1 = torch.cat([row1, torch.tensor([hi - 1])])
    return torch.stack([row0, row1])


def qwen2vl_positions(offset=1500):
    """Real 3-stream Qwen2-VL position_ids [3, 2, 40], built as get_rope_index does: text
    tokens share one position in all streams; an image/video grid (t, h, w) starts at the
    running text position st, token (tt, hh, ww) sits at (st + tt, st + hh, st + ww); text
    after it resumes at st + max(t, h, w)."""
    def row(n_text, grid, n_after, start):
        streams = [[], [], []]
        for p in range(start, start + n_text):
            for s in streams:
                s.append(p)
        st = start + n_text
        t, h, w = grid
        for tt in range(t):
            for hh in range(h):
                for ww in range(w):
                    streams[0].append(st + tt)
                    streams[1].append(st + hh)
                    streams[2].append(st + ww)
        nxt = st + max(t, h, w)
        for p in range(nxt, nxt + n_after):
            for s in streams:
                s.append(p)
        return torch.tensor(streams)

    r0 = row(3, (1, 4, 6), 13, 0)            # text, image 4 x 6, text
    r1 = row(7, (2, 2, 4), 17, offset)       # deep in the context: text, video 2 x 2 x 4, text
    assert r0.shape == r1.shape == (3, 40)
    return torch.stack([r0, r1], dim=1)


def make_qk(family, cfg, seq, dtype, gen):
    hq, hk = _heads(cfg)
    d = _head_dim(cfg)
    if family.layout == "bhsd":
        qs, ks = (2, hq, seq, d), (2, hk, seq, d)
    else:
        qs, ks = (2, seq, hq, d), (2, seq, hk, d)
    q = torch.randn(qs, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(ks, generator=gen, dtype=torch.float64).to(dtype)
    return q, k


def to_bshd(t, layout):
    return t.transpose(1, 2) if layout == "bhsd" else t


# ---------------------------------------------------------------------------------------------
# a) inv_freq and attention factor
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILY_IDS)
def test_inv_freq_and_attention_factor(name):
    family = BY_NAME[name]
    cfg = family.make_config()
    ours = rope_ext.RotaryEmbedding.from_hf_config(cfg)
    theirs, their_factor = hf_inv_freq(family, cfg)
    d = _head_dim(cfg)
    assert ours.head_dim == d
    assert ours.interleaved == (family.kind == "gptj")
    if family.kind == "gptj":
        assert ours.rotary_dim == cfg.rotary_dim and ours.base == 10000.0
        # GPT-J keeps no inv_freq: its table [sin | cos] is built from one with base 10000.
        attn = gptj_attention(cfg)
        table = attn.embed_positions
        r = cfg.rotary_dim
        assert table.shape == (cfg.max_position_embeddings, r)
        m = torch.arange(table.shape[0])[:, None]
        tol = angle_error_bound(ours.inv_freq, hf_theta_error(family, ours, None), m) \
            + FLOAT32_SLACK
        assert ours.cos.shape == (cfg.max_position_embeddings, r // 2)
        assert ((ours.cos.double() - table[:, r // 2:].double()).abs() <= tol).all()
        assert ((ours.sin.double() - table[:, : r // 2].double()).abs() <= tol).all()
    else:
        r = 2 * theirs.numel()
        assert ours.rotary_dim == r
        base = cfg.rope_parameters["rope_theta"]
        assert ours.base == float(base)
        assert_inv_freq_matches(ours.inv_freq, theirs, base, r)
    assert isinstance(ours.attention_factor, float)
    assert math.isclose(ours.attention_factor, their_factor, rel_tol=1e-12), (
        ours.attention_factor, their_factor)
    if name.startswith("phi"):
        # LongRoPE with factor absent: max_position_embeddings / original = 32.
        assert math.isclose(ours.attention_factor, math.sqrt(1 + math.log(32) / math.log(4096)),
                            rel_tol=1e-12)
    if name == "qwen2-yarn":
        assert math.isclose(ours.attention_factor, 0.1 * math.log(4.0) + 1, rel_tol=1e-12)


@pytest.mark.parametrize("name", FAMILY_IDS)
def test_config_as_plain_dict(name):
    """config.to_dict() (what config.json holds) reads the same as the config object."""
    family = BY_NAME[name]
    cfg = family.make_config()
    a = rope_ext.RotaryEmbedding.from_hf_config(cfg)
    b = rope_ext.RotaryEmbedding.from_hf_config(cfg.to_dict())
    assert (a.head_dim, a.rotary_dim, a.base, a.max_positions, a.interleaved, a.mrope_section) \
        == (b.head_dim, b.rotary_dim, b.base, b.max_positions, b.interleaved, b.mrope_section)
    assert torch.equal(a.inv_freq, b.inv_freq)
    assert a.attention_factor == b.attention_factor


_SF, _LF = _phi3_factors(48)
LEGACY_JSON = {  # config.json files as checkpoints ship them (older layouts), shrunk
    "llama2": dict(model_type="llama", hidden_size=256, num_attention_heads=2,
                   max_position_embeddings=4096, rope_theta=10000.0, rope_scaling=None),
    "llama3.1": dict(model_type="llama", hidden_size=256, num_attention_heads=2,
                     num_key_value_heads=1, max_position_embeddings=131072,
                     rope_theta=500000.0,
                     rope_scaling={"factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192,
                                   "rope_type": "llama3"}),
    "mistral-v0.2": dict(model_type="mistral", hidden_size=256, num_attention_heads=2,
                         max_position_embeddings=32768, rope_theta=1e6),
    "qwen2-yarn": dict(model_type="qwen2", hidden_size=256, num_attention_heads=2,
                       max_position_embeddings=32768, rope_theta=1e6,
                       rope_scaling={"type": "yarn", "factor": 4.0,
                                     "original_max_position_embeddings": 32768}),
    "phi3-mini-128k": dict(model_type="phi3", hidden_size=192, num_attention_heads=2,
                           max_position_embeddings=131072,
                           original_max_position_embeddings=4096, rope_theta=10000.0,
                           rope_scaling={"type": "longrope", "short_factor": _SF,
                                         "long_factor": _LF}),
    "phi4-mini": dict(model_type="phi3", hidden_size=256, num_attention_heads=2,
                      partial_rotary_factor=0.75, max_position_embeddings=131072,
                      original_max_position_embeddings=4096, rope_theta=10000.0,
                      rope_scaling={"type": "longrope", "short_factor": _SF,
                                    "long_factor": _LF}),
    "pythia": dict(model_type="gpt_neox", hidden_size=512, num_attention_heads=8,
                   rotary_pct=0.25, rotary_emb_base=10000, max_position_embeddings=2048),
    "gemma": dict(model_type="gemma", hidden_size=128, num_attention_heads=2, head_dim=256,
                  max_position_embeddings=8192, rope_theta=10000.0),
    "qwen2-vl": dict(model_type="qwen2_vl", hidden_size=256, num_attention_heads=2,
                     max_position_embeddings=32768, rope_theta=1e6,
                     rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
    "gpt-j-6b": dict(model_type="gptj", n_embd=256, n_head=2, rotary_dim=64,
                     n_positions=2048),
}
_LEGACY_ROTARY = {"llama": (modeling_llama, "LlamaRotaryEmbedding"),
                  "mistral": (modeling_mistral, "MistralRotaryEmbedding"),
                  "qwen2": (modeling_qwen2, "Qwen2RotaryEmbedding"),
                  "phi3": (modeling_phi3, "Phi3RotaryEmbedding"),
                  "gpt_neox": (modeling_gpt_neox, "GPTNeoXRotaryEmbedding"),
                  "gemma": (modeling_gemma, "GemmaRotaryEmbedding"),
                  "qwen2_vl": (modeling_qwen2_vl, "Qwen2VLRotaryEmbedding")}


@pytest.mark.parametrize("name", list(LEGACY_JSON))
def test_legacy_config_json(name):
    """A raw config.json dict read by from_hf_config means what transformers makes of it:
    the config class built from the same dict, then the family's rotary module."""
    raw = copy.deepcopy(LEGACY_JSON[name])
    model_type = raw["model_type"]
    if model_type == "qwen2_vl" and modeling_qwen2_vl is None:  # pragma: no cover
        pytest.skip("transformers without Qwen2-VL")
    cfg = transformers.CONFIG_MAPPING[model_type](
        **{k: v for k, v in copy.deepcopy(raw).items() if k != "model_type"})
    ours = rope_ext.RotaryEmbedding.from_hf_config(raw)
    if model_type == "gptj":
        attn = gptj_attention(cfg)
        assert ours.interleaved and ours.base == 10000.0
        assert ours.head_dim == attn.head_dim and ours.rotary_dim == attn.rotary_dim
        assert ours.max_positions == attn.embed_positions.shape[0] == raw["n_positions"]
        return
    text_cfg = getattr(cfg, "text_config", None) or cfg  # Qwen2-VL's text model reads this
    module, cls = _LEGACY_ROTARY[model_type]
    hf = getattr(module, cls)(config=text_cfg)
    r = 2 * hf.inv_freq.numel()
    assert ours.rotary_dim == r
    assert ours.max_positions == text_cfg.max_position_embeddings
    assert_inv_freq_matches(ours.inv_freq, hf.inv_freq, text_cfg.rope_parameters["rope_theta"], r)
    assert math.isclose(ours.attention_factor, hf.attention_scaling, rel_tol=1e-12)
    if model_type == "qwen2_vl":
        assert ours.mrope_section == hf.mrope_section == [16, 24, 24]


@pytest.mark.skipif(modeling_qwen2_vl is None, reason="transformers without Qwen2-VL")
def test_qwen2vl_composite_config():
    """The config a Qwen2-VL checkpoint loads as (Qwen2VLConfig, text fields in text_config)
    gives the same module as its text_config: transformers' text model reads text_config."""
    text = BY_NAME["qwen2-vl"].make_config().to_dict()
    cfg = configuration_qwen2_vl.Qwen2VLConfig(text_config=text)
    expected = rope_ext.RotaryEmbedding.from_hf_config(cfg.text_config)
    ours = rope_ext.RotaryEmbedding.from_hf_config(cfg)
    assert (ours.head_dim, ours.rotary_dim, ours.base, ours.mrope_section) == \
        (expected.head_dim, expected.rotary_dim, expected.base, expected.mrope_section)
    assert torch.equal(ours.inv_freq, expected.inv_freq)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layer_type", ["full_attention", "sliding_attention"])
def test_gemma3_per_layer_type(layer_type, dtype):
    """Gemma 3: one rope dict per layer type (global: base 1e6 with linear factor 8; local:
    base 1e4), picked by from_hf_config(layer_type=...), against Gemma3RotaryEmbedding."""
    from transformers.models.gemma3 import modeling_gemma3

    cfg = transformers.Gemma3TextConfig(
        hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=256,
        max_position_embeddings=8192,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                            "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    hf = modeling_gemma3.Gemma3RotaryEmbedding(config=cfg)
    ours = rope_ext.RotaryEmbedding.from_hf_config(cfg, layout="bhsd", layer_type=layer_type)
    theirs = getattr(hf, f"{layer_type}_inv_freq")
    base = 1e6 if layer_type == "full_attention" else 10000.0
    assert ours.base == base and ours.rotary_dim == 256
    assert_inv_freq_matches(ours.inv_freq, theirs, base, 256)
    assert ours.attention_factor == getattr(hf, f"{layer_type}_attention_scaling") == 1.0
    gen = torch.Generator().manual_seed(9)
    pos = batch_positions(32, 0, 4096, gen)
    q = torch.randn(2, 2, 32, 256, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(2, 1, 32, 256, generator=gen, dtype=torch.float64).to(dtype)
    q_ours, k_ours = ours(q, k, pos)
    cos, sin = hf(q, pos, layer_type)
    q_hf, k_hf = modeling_gemma3.apply_rotary_pos_emb(q, k, cos, sin)
    delta = angle_error_bound(ours.inv_freq, (theirs.double() - ours.inv_freq).abs(),
                              pos[..., None])
    slack = FLOAT32_SLACK if dtype == torch.float32 else BF16_SLACK
    tol = (delta + slack)[:, :, None, :]
    for o, t, x in ((q_ours, q_hf, q), (k_ours, k_hf, k)):
        assert_rotation_close(o.transpose(1, 2), t.transpose(1, 2), x.transpose(1, 2), 256,
                              False, tol)


# ---------------------------------------------------------------------------------------------
# b) the rotation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", FAMILY_IDS)
def test_rotation_matches_transformers(name, dtype):
    family = BY_NAME[name]
    cfg = family.make_config()
    gen = torch.Generator().manual_seed(1234)
    ours_mod = rope_ext.RotaryEmbedding.from_hf_config(cfg, layout=family.layout)
    hf_mod = gptj_attention(cfg) if family.kind == "gptj" else hf_rotary(family, cfg)
    seq = 40 if family.kind == "mrope" else 48
    if family.kind == "mrope":
        position_ids = qwen2vl_positions()
        sec = ours_mod.mrope_section
        assert sec == [16, 24, 24]
        stream = torch.repeat_interleave(torch.arange(3), torch.tensor(sec))
        m = position_ids[stream].permute(1, 2, 0)  # [B, S, r/2]: each pair's own position
    else:
        position_ids = batch_positions(seq, family.min_pos, family.max_pos, gen)
        m = position_ids[..., None]
    q, k = make_qk(family, cfg, seq, dtype, gen)
    q_ours, k_ours = ours_mod(q, k, position_ids)
    q_hf, k_hf = hf_rotate(family, cfg, q, k, position_ids, module=hf_mod)
    # transformers' inv_freq after the call (LongRoPE switched it to the long one).
    theirs_inv = None if family.kind == "gptj" else hf_mod.inv_freq
    if family.min_pos > 0:  # the long-table families really run on the long table
        assert ours_mod.inv_freq is not ours_mod.original_inv_freq

    r = ours_mod.rotary_dim
    delta = angle_error_bound(ours_mod.inv_freq, hf_theta_error(family, ours_mod, theirs_inv), m)
    slack = FLOAT32_SLACK if dtype == torch.float32 else BF16_SLACK
    tol = (ours_mod.attention_factor * (delta + slack))[:, :, None, :]  # [B, S, 1, r/2]
    for o, t, x in ((q_ours, q_hf, q), (k_ours, k_hf, k)):
        assert_rotation_close(to_bshd(o, family.layout), to_bshd(t, family.layout),
                              to_bshd(x, family.layout), r, ours_mod.interleaved, tol)


def test_rotation_comparison_is_not_vacuous():
    """The comparison above notices a wrong pairing, a position off by one, or a lost A."""
    family = BY_NAME["phi4-mini"]
    cfg = family.make_config()
    gen = torch.Generator().manual_seed(0)
    mod = rope_ext.RotaryEmbedding.from_hf_config(cfg, layout="bhsd")
    pos = batch_positions(16, 0, 4096, gen)
    q, k = make_qk(family, cfg, 16, torch.float32, gen)
    q_hf, _ = hf_rotate(family, cfg, q, k, pos)
    r = mod.rotary_dim
    tol = torch.full((1, 1, 1, r // 2), mod.attention_factor * 1e-3)
    wrong = [
        rope_ext.apply_rope(q, mod.cos, mod.sin, pos, interleaved=True, layout="bhsd"),
        rope_ext.apply_rope(q, *rope_ext.cos_sin_table(mod.inv_freq, 4096), pos, layout="bhsd"),
        mod(q, k, pos + 1)[0],
    ]
    for w in wrong:
        with pytest.raises(AssertionError):
            assert_rotation_close(w.transpose(1, 2), q_hf.transpose(1, 2), q.transpose(1, 2),
                                  r, False, tol)


@pytest.mark.skipif(modeling_qwen2_vl is None, reason="transformers without Qwen2-VL")
def test_mrope_comparison_is_not_vacuous():
    """With real 3-stream positions, the wrong stream assignment (Qwen3-VL's interleaved one,
    or text-only positions) is far outside the tolerance of the MRoPE comparison."""
    family = BY_NAME["qwen2-vl"]
    cfg = family.make_config()
    gen = torch.Generator().manual_seed(0)
    mod = rope_ext.RotaryEmbedding.from_hf_config(cfg, layout="bhsd")
    pos = qwen2vl_positions()
    assert not torch.equal(pos[0], pos[1]) and not torch.equal(pos[1], pos[2])
    q, k = make_qk(family, cfg, 40, torch.float32, gen)
    q_hf, _ = hf_rotate(family, cfg, q, k, pos)
    tol = torch.full((1, 1, 1, 64), 1e-3)
    wrong = [
        rope_ext.apply_rope(q, mod.cos, mod.sin, pos, layout="bhsd", mrope_section=[16, 24, 24],
                            mrope_interleaved=True),
        rope_ext.apply_rope(q, mod.cos, mod.sin, pos[0], layout="bhsd"),
    ]
    for w in wrong:
        with pytest.raises(AssertionError):
            assert_rotation_close(w.transpose(1, 2), q_hf.transpose(1, 2), q.transpose(1, 2),
                                  128, False, tol)


# ---------------------------------------------------------------------------------------------
# c) tables that follow the sequence: dynamic NTK and LongRoPE
# ---------------------------------------------------------------------------------------------


def assert_table_matches_hf(mod, hf_cos, hf_sin, theirs_inv, position_ids):
    """Our table rows at position_ids against transformers' cos/sin output [B, S, r]
    (halves duplicated, A included)."""
    r = mod.rotary_dim
    assert torch.equal(hf_cos[..., : r // 2], hf_cos[..., r // 2:])
    m = position_ids[..., None]
    delta = angle_error_bound(mod.inv_freq, (theirs_inv.double() - mod.inv_freq).abs(), m)
    tol = mod.attention_factor * (delta + FLOAT32_SLACK)
    for ours, theirs in ((mod.cos, hf_cos), (mod.sin, hf_sin)):
        diff = (ours[position_ids].double() - theirs[..., : r // 2].double()).abs()
        assert (diff <= tol).all(), (diff - tol).max().item()


def _dynamic_config(L, head_dim=64, base=10000.0):
    return transformers.LlamaConfig(
        hidden_size=2 * head_dim, num_attention_heads=2, num_key_value_heads=2,
        head_dim=head_dim, max_position_embeddings=L,
        rope_parameters={"rope_type": "dynamic", "rope_theta": base, "factor": 2.0})


@pytest.mark.parametrize("with_positions", [True, False], ids=["positions", "no-positions"])
def test_dynamic_ntk_follows_transformers(with_positions):
    L, base, factor, d = 64, 10000.0, 2.0, 64
    cfg = _dynamic_config(L, d, base)
    hf = modeling_llama.LlamaRotaryEmbedding(config=cfg)
    ours = rope_ext.RotaryEmbedding.from_hf_config(cfg, layout="bhsd")
    default = default_inv_freq(d, base)
    grown = dynamic_inv_freq(d, base, factor, L, 2 * L)
    assert not torch.allclose(grown, default)  # the sequence below is not vacuous
    gen = torch.Generator().manual_seed(7)
    # (sequence length, expected inv_freq, expected cached length)
    steps = [(L // 2, default, L), (2 * L, grown, 2 * L), (3 * L // 2, grown, 2 * L),
             (L // 2, default, L)]
    for seq, expected, cached in steps:
        pos = torch.arange(seq)[None].expand(2, seq)
        q = torch.randn(2, 2, seq, d, generator=gen)
        k = torch.randn(2, 2, seq, d, generator=gen)
        q_ours, k_ours = ours(q, k, pos if with_positions else None)
        hf_cos, hf_sin = hf(q, pos)
        # transformers' state after the call
        assert int(hf.max_seq_len_cached) == cached
        assert_inv_freq_matches(ours.inv_freq, hf.inv_freq, float(base) * 3.0 ** (d / (d - 2)), d)
        # ours: exactly the expected table, and the same bookkeeping
        assert torch.equal(ours.inv_freq, expected), seq
        assert ours.table_seq_len == cached
        # With positions the table keeps max_positions rows and the kernel computes the rows
        # past it (exactly cos_sin_table's: tests/test_any_position.py); without, it grows.
        rows = ours.cos.shape[0]
        assert ours.cos.dtype == torch.float32
        assert rows >= (ours.max_positions if with_positions else seq)
        assert torch.equal(ours.cos, rope_ext.cos_sin_table(expected, rows)[0])
        used = types.SimpleNamespace(rotary_dim=ours.rotary_dim, inv_freq=ours.inv_freq,
                                     attention_factor=ours.attention_factor)
        used.cos, used.sin = rope_ext.cos_sin_table(ours.inv_freq, max(rows, seq),
                                                    ours.attention_factor)
        assert_table_matches_hf(used, hf_cos, hf_sin, hf.inv_freq, pos)
        # and the rotation against transformers' apply
        q_hf, k_hf = modeling_llama.apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
        delta = angle_error_bound(ours.inv_freq, (hf.inv_freq.double() - ours.inv_freq).abs(),
                                  pos[..., None])
        tol = (delta + FLOAT32_SLACK)[:, :, None, :]
        for o, t, x in ((q_ours, q_hf, q), (k_ours, k_hf, k)):
            assert_rotation_close(o.transpose(1, 2), t.transpose(1, 2), x.transpose(1, 2), d,
                                  False, tol)


def test_dynamic_ntk_batch_max_decides():
    """s = max(positions) + 1 over the whole batch: one long row grows the base for all rows."""
    L, d = 64, 64
    cfg = _dynamic_config(L, d)
    hf = modeling_llama.LlamaRotaryEmbedding(config=cfg)
    ours = rope_ext.RotaryEmbedding.from_hf_config(cfg, layout="bhsd")
    pos = torch.stack([torch.arange(10), torch.arange(150, 160)])  # s = 160 > L
    q = torch.randn(2, 2, 10, d)
    ours(q, q, pos)
    hf(q, pos)
    assert int(hf.max_seq_len_cached) == ours.table_seq_len == 160
    assert torch.equal(ours.inv_freq, dynamic_inv_freq(d, 10000.0, 2.0, L, 160))
    assert_inv_freq_matches(ours.inv_freq, hf.inv_freq, 10000.0 * 4.0 ** (d / (d - 2)), d)


@pytest.mark.parametrize("partial", [None, 0.75])
def test_longrope_flips_like_transformers(partial):
    L0, d = 64, 128 if partial else 96
    r = int(d * (partial or 1.0))
    short, long = _phi3_factors(r // 2)
    kwargs = {} if partial is None else {"partial_rotary_factor": partial}
    cfg = transformers.Phi3Config(
        hidden_size=2 * d, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=256, original_max_position_embeddings=L0,
        rope_scaling={"rope_type": "longrope", "short_factor": short, "long_factor": long},
        **kwargs)
    hf = modeling_phi3.Phi3RotaryEmbedding(config=cfg)
    ours = rope_ext.RotaryEmbedding.from_hf_config(cfg, layout="bhsd")
    scaling = ours.scaling
    short_inv = longrope_inv_freq(r, 10000.0, scaling, long=False)
    long_inv = longrope_inv_freq(r, 10000.0, scaling, long=True)
    A = math.sqrt(1 + math.log(256 / L0) / math.log(L0))
    assert math.isclose(ours.attention_factor, A, rel_tol=1e-12)
    assert math.isclose(hf.attention_scaling, A, rel_tol=1e-12)
    gen = torch.Generator().manual_seed(3)
    for seq, is_long in [(L0 - 1, False), (L0, False), (L0 + 1, True), (L0 + 2, True),
                         (200, True), (L0, False), (5, False), (L0 + 1, True)]:
        pos = torch.stack([torch.arange(seq), torch.arange(seq)])
        q = torch.randn(2, 2, seq, d, generator=gen)
        k = torch.randn(2, 2, seq, d, generator=gen)
        q_ours, k_ours = ours(q, k, pos)
        hf_cos, hf_sin = hf(q, pos)
        assert torch.equal(ours.inv_freq, long_inv if is_long else short_inv), seq
        assert_inv_freq_matches(ours.inv_freq, hf.inv_freq, 10000.0, r)
        # The two tables differ by far more than the rounding allowed above.
        other = short_inv if is_long else long_inv
        assert ((hf.inv_freq.double() - other).abs() > 1e-3 * other).any()
        assert ours.attention_factor == A and hf.attention_scaling == A
        assert_table_matches_hf(ours, hf_cos, hf_sin, hf.inv_freq, pos)
        q_hf, k_hf = modeling_phi3.apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
        delta = angle_error_bound(ours.inv_freq, (hf.inv_freq.double() - ours.inv_freq).abs(),
                                  pos[..., None])
        tol = (A * (delta + FLOAT32_SLACK))[:, :, None, :]
        for o, t, x in ((q_ours, q_hf, q), (k_ours, k_hf, k)):
            assert_rotation_close(o.transpose(1, 2), t.transpose(1, 2), x.transpose(1, 2), r,
                                  False, tol)


# ---------------------------------------------------------------------------------------------
# d) dtype casts of the module keep the float32 table
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cast", ["to-bf16", "to-kw-fp16", "half", "bfloat16", "to-cpu-bf16"])
@pytest.mark.parametrize("name", [n for n in ("llama3.1", "phi4-mini", "gpt-j", "qwen2-vl")
                                  if n in BY_NAME])
def test_module_cast_keeps_float32_table(name, cast):
    family = BY_NAME[name]
    cfg = family.make_config()
    ref_mod = rope_ext.RotaryEmbedding.from_hf_config(cfg, layout=family.layout)
    mod = copy.deepcopy(ref_mod)
    out = {"to-bf16": lambda m: m.to(torch.bfloat16),
           "to-kw-fp16": lambda m: m.to(dtype=torch.float16),
           "half": lambda m: m.half(),
           "bfloat16": lambda m: m.bfloat16(),
           "to-cpu-bf16": lambda m: m.to("cpu", torch.bfloat16)}[cast](mod)
    assert out is mod
    assert mod.cos.dtype == mod.sin.dtype == torch.float32
    assert torch.equal(mod.cos, ref_mod.cos) and torch.equal(mod.sin, ref_mod.sin)
    assert mod.inv_freq.dtype == torch.float64 and torch.equal(mod.inv_freq, ref_mod.inv_freq)
    xdtype = torch.float16 if "fp16" in cast or cast == "half" else torch.bfloat16
    gen = torch.Generator().manual_seed(5)
    if family.kind == "mrope":
        pos, seq = qwen2vl_positions(), 40
    else:
        pos, seq = batch_positions(32, family.min_pos, family.max_pos, gen), 32
    q, k = make_qk(family, cfg, seq, xdtype, gen)
    got = mod(q, k, pos)
    want = ref_mod(q, k, pos)
    assert got[0].dtype == xdtype
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_cast_then_dynamic_growth_stays_float32():
    cfg = _dynamic_config(64)
    mod = rope_ext.RotaryEmbedding.from_hf_config(cfg, layout="bhsd").to(torch.bfloat16)
    q = torch.randn(1, 2, 128, 64, dtype=torch.bfloat16)
    mod(q, q)
    assert mod.table_seq_len == 128 and mod.cos.dtype == torch.float32
    assert torch.equal(mod.cos, rope_ext.cos_sin_table(
        dynamic_inv_freq(64, 10000.0, 2.0, 64, 128), 128)[0])
    mod.to(torch.float16)  # a cast after growth keeps the grown table, float32
    assert mod.table_seq_len == 128 and mod.cos.dtype == torch.float32
    assert torch.equal(mod.inv_freq, dynamic_inv_freq(64, 10000.0, 2.0, 64, 128))


def test_transformers_cast_is_the_hazard_we_avoid():
    """For contrast: transformers' module cast to bf16 rounds inv_freq to bf16 (docs/math.md
    section 8), so its angles at position 4000 are off by radians; ours stays exact."""
    family = BY_NAME["llama2"]
    cfg = family.make_config()
    hf = hf_rotary(family, cfg).to(torch.bfloat16)
    assert hf.inv_freq.dtype == torch.bfloat16
    ours = rope_ext.RotaryEmbedding.from_hf_config(cfg).to(torch.bfloat16)
    pos = torch.tensor([[4000]])
    x = torch.zeros(1, 1, 1, 128, dtype=torch.bfloat16)
    hf_cos, _ = hf(x, pos)
    exact = torch.cos(4000 * ours.inv_freq)
    assert (hf_cos[0, 0, :64].double() - exact).abs().max() > 0.1
    assert (ours.cos[4000].double() - exact).abs().max() <= 2.0**-24
