"""rope_ext.hf.patch() on every transformers model type it patches: the same logits and the
same gradients as transformers' own code, with rope_ext's op doing the rotation.

* test_family: the model types of the issue, each from a tiny random config of its own config
  class (TINY: 2 layers, hidden 64, 4 query / 2 key-value heads, head_dim 16, vocab 128, small
  MoE / linear-attention / Mamba / MLA sizes, both kinds of layers where the family mixes
  sliding and full or linear and full attention), float32, eager attention, norm weights moved
  off their initial value. Unpatched, then inside ``rope_ext.hf.patched(model_type)``, then
  after it: the logits within 1e-4 of the largest one, every parameter gradient within 1e-4
  of its largest element, rope_ext's replacement called exactly where transformers' function
  was (counted) and rope_ext's op run (counted with a TorchDispatchMode), and the logits after
  the block bit-identical to the unpatched ones.
* test_every_patched_module: the same comparison for every modeling module that
  ``rope_ext.hf.patch()`` patches once all discovered modules are imported, on the model types
  of that module that build generically from ``AutoConfig.for_model(type, **GENERIC_TINY)`` as
  a causal LM or a base model and run on input_ids alone. The modules where no type does
  (vision towers, audio, encoder-decoders, composite configs) are NOT_GENERIC, checked by
  test_not_generic_list_is_exact, and not counted as passing.
"""

import collections
import contextlib
import importlib
import inspect
import sys
import warnings

import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig
from transformers.models.auto.configuration_auto import (CONFIG_MAPPING_NAMES,
                                                         model_type_to_module_name)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

import rope_ext.hf as hf
from rope_ext.hf import registry
from tiny_models import COMMON, assert_grads_close, inputs, rel_err

transformers.logging.set_verbosity_error()

RTOL = 1e-4

# ---------------------------------------------------------------------------------------------
# Tiny configs

BASE = {**COMMON, "use_cache": False, "attention_dropout": 0.0, "tie_word_embeddings": False}
SLIDING = dict(layer_types=["sliding_attention", "full_attention"], sliding_window=4)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
# Gated DeltaNet (Qwen3-Next, Qwen3.5): layer 0 linear attention, layer 1 full attention (RoPE)
LINEAR = dict(layer_types=["linear_attention", "full_attention"], linear_key_head_dim=16,
              linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
              linear_conv_kernel_dim=4)
MROPE = {"rope_type": "default", "rope_theta": 10000.0}

TINY = {
    "llama": {},
    # layer 0 chunked attention with RoPE, layer 1 full attention without (NoPE), as Llama 4
    "llama4_text": dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size=64,
                        intermediate_size_mlp=128, interleave_moe_layer_step=1,
                        layer_types=["chunked_attention", "full_attention"],
                        no_rope_layers=[1, 0], attention_chunk_size=4),
    "mistral": dict(sliding_window=4),
    "ministral": SLIDING,
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2": dict(SLIDING, use_sliding_window=True, max_window_layers=2),
    "qwen2_moe": dict(MOE, num_experts=4, shared_expert_intermediate_size=32),
    "qwen3": dict(SLIDING, use_sliding_window=True, max_window_layers=2),
    "qwen3_moe": dict(MOE, num_experts=4),
    "qwen3_next": dict(**LINEAR, **MOE, num_experts=4, shared_expert_intermediate_size=32,
                       partial_rotary_factor=0.5),
    "qwen3_5_text": dict(LINEAR, partial_rotary_factor=0.5),
    "qwen3_5_moe_text": dict(**LINEAR, **MOE, num_experts=4, shared_expert_intermediate_size=32,
                             partial_rotary_factor=0.5),
    "qwen2_5_vl_text": dict(rope_parameters=dict(MROPE, mrope_section=[2, 3, 3])),
    "qwen3_vl_text": dict(rope_parameters=dict(MROPE, mrope_section=[4, 2, 2])),
    "gemma2": dict(SLIDING, query_pre_attn_scalar=16),
    "gemma3_text": dict(SLIDING, query_pre_attn_scalar=16),
    # full-attention layers: head_dim 32, proportional RoPE over a quarter of it
    "gemma4_text": dict(SLIDING, global_head_dim=32, vocab_size_per_layer_input=128,
                        hidden_size_per_layer_input=16),
    "phi3": dict(partial_rotary_factor=0.5),
    "gpt_oss": dict(SLIDING, num_local_experts=4, num_experts_per_tok=2, intermediate_size=32),
    "deepseek_v3": dict(MOE, n_routed_experts=4, n_shared_experts=1, n_group=1, topk_group=1,
                        first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48,
                        qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
                        num_key_value_heads=4, rope_interleave=True),
    "glm4": {},
    "glm4_moe": dict(MOE, n_routed_experts=4, n_shared_experts=1, n_group=1, topk_group=1,
                     first_k_dense_replace=1, use_qk_norm=True),
    "olmo2": {},
    "olmo3": SLIDING,
    "smollm3": dict(no_rope_layers=[1, 0]),  # layer 1 without RoPE (NoPE)
    "granite": dict(embedding_multiplier=2.0, residual_multiplier=0.5,
                    attention_multiplier=0.2, logits_scaling=4.0),
    # layer 0 Mamba 2, layer 1 attention with RoPE
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"],
                             position_embedding_type="rope", num_local_experts=4,
                             num_experts_per_tok=2, shared_intermediate_size=32,
                             mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16,
                             mamba_chunk_size=8),
    "ernie4_5": {},
    "seed_oss": {},
    "exaone4": SLIDING,  # RoPE on the sliding-window layers only, as EXAONE 4
    "apertus": {},
    # every layer attention (RoPE) and Mamba 2 side by side
    "falcon_h1": dict(mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16,
                      mamba_chunk_size=8),
    "cohere2": SLIDING,  # RoPE on the sliding-window layers only, as Command R7B
    "starcoder2": dict(sliding_window=4),
    "gpt_neox": {},
    "stablelm": dict(qk_layernorm=True),
    "nemotron": {},
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
}
# cases of test_family: model type -> (model type, its config kwargs)
CASES = {t: (t, kw) for t, kw in TINY.items()}
CASES["deepseek_v3-no-interleave"] = ("deepseek_v3", {**TINY["deepseek_v3"],
                                                      "rope_interleave": False})

# The generic sweep: the same sizes, plus the MoE / MLA / linear-attention / Mamba / Gemma
# per-layer settings by their common names (a config without such a field just keeps it).
GENERIC_TINY = {
    **BASE,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "n_group": 1,
    "topk_group": 1, "n_shared_experts": 1, "kv_lora_rank": 32, "q_lora_rank": 48,
    "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 16, "linear_key_head_dim": 16,
    "linear_value_head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_d_state": 16, "mamba_chunk_size": 8,
    "vocab_size_per_layer_input": 128, "hidden_size_per_layer_input": 16,
    "global_head_dim": 32,
}
# multi-head latent attention: the config's own head_dim (from the MLA sizes), kv heads = heads
MLA = {"head_dim": None, "num_key_value_heads": 4}
GENERIC_EXTRA = {  # model type -> kwargs over GENERIC_TINY (None: the config's default)
    **{t: MLA for t in ("deepseek_v2", "deepseek_v32", "glm4_moe_lite", "glm_moe_dsa",
                        "minicpm3", "youtu", "axk1", "axk2", "mistral4")},
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),
    "zamba2": dict(layers_block_type=["mamba", "hybrid"], use_mem_rope=True),
    "zaya": dict(num_experts_per_tok=1),
    "recurrent_gemma": dict(block_types=["recurrent", "attention"]),
    "bamba": dict(attn_layer_indices=[1]),
    "esm": dict(position_embedding_type="rotary"),
    "esmc": dict(num_key_value_heads=4),
    "falcon": dict(head_dim=None, new_decoder_architecture=True, num_kv_heads=2),
    "gptj": dict(rotary_dim=8),
    "codegen": dict(rotary_dim=8),
    "gemma3n_text": dict(SLIDING, num_kv_shared_layers=0),
    "qwen2_vl_text": dict(rope_parameters=dict(MROPE, mrope_section=[2, 3, 3])),
    "glm4v_text": dict(rope_parameters=dict(MROPE, mrope_section=[2, 3, 3])),
    "glm_image_text": dict(rope_parameters=dict(MROPE, mrope_section=[2, 3, 3])),
    "glm_ocr_text": dict(rope_parameters=dict(MROPE, mrope_section=[2, 3, 3])),
    "glm4v_moe_text": dict(rope_parameters=dict(MROPE, mrope_section=[1, 1, 2])),
    "cosmos3_edge_text": dict(rope_parameters=dict(MROPE, mrope_section=[2, 3, 3])),
    "hunyuan_vl_text": dict(rope_parameters=dict(MROPE, mrope_section=[2, 3, 3])),
    # the VQ-VAE image tokenizer of Chameleon kept small (image token 0: never in the input)
    "chameleon": dict(vocabulary_map={"<image>": 0},
                      vq_config=dict(embed_dim=8, num_embeddings=16, latent_channels=8,
                                     base_channels=32, channel_multiplier=[1, 1],
                                     num_res_blocks=1, resolution=32)),
    "dbrx": dict(d_model=64,  # read by DbrxConfig before hidden_size is mapped onto it
                 # transformers 5.18's DBRX reads rope_theta from attn_config, which has no such
                 # field, and clamps q/k/v with clip_qkv, which fails with the default None
                 attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                 ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2)),
    "longcat_flash": dict(num_key_value_heads=4),
    "step3p5": dict(sliding_window=4),
    "qwen2_5_omni_text": dict(rope_parameters=dict(MROPE, mrope_section=[2, 3, 3])),
    "csm_depth_decoder_model": dict(backbone_hidden_size=64),
    "diffusion_gemma_text": dict(top_k_experts=2),
    "deepseek_ocr2_text": dict(mlp_layer_types=["dense", "sparse"]),
    # per-layer-type RoPE, each with its (pre-rotated) 3-D sections over head_dim / 2 = 8
    "cohere_compass_text": dict(
        SLIDING, rope_parameters={t: dict(MROPE, mrope_section=[3, 3, 2])
                                  for t in ("sliding_attention", "full_attention")}),
}
MAX_PARAMS = 5_000_000  # larger than this from GENERIC_TINY: a config that ignores the sizes


def module_of(model_type):
    """The modeling module that holds model_type's RoPE code (rope_ext.hf's naming)."""
    folder = model_type_to_module_name(model_type)
    return f"transformers.models.{folder}.modeling_{folder.rsplit('.', 1)[-1]}"


# ---------------------------------------------------------------------------------------------
# Building and running


def config_of(model_type, kwargs):
    """model_type's own config class from kwargs (a None value: the config's own default)."""
    return AutoConfig.for_model(model_type, **{k: v for k, v in kwargs.items() if v is not None})


def model_classes(model_type, cfg):
    """The classes that take cfg alone and run on input_ids, in the order tried: the causal LM
    of the auto mapping, its base model, then the causal LM and the models of cfg's class in
    model_type's module (the text model of a multimodal family, e.g. MllamaForCausalLM for
    mllama_text_model, which no auto mapping lists)."""
    found = [m[type(cfg)] for m in (MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING)
             if type(cfg) in m]
    mod = importlib.import_module(module_of(model_type))
    own = [c for n, c in vars(mod).items()
           if isinstance(c, type) and issubclass(c, transformers.PreTrainedModel)
           and c.__module__ == mod.__name__ and c.__dict__.get("config_class") is type(cfg)
           and (n.endswith("ForCausalLM") or n.endswith("Model"))
           and not n.endswith("PreTrainedModel")]
    own.sort(key=lambda c: not c.__name__.endswith("ForCausalLM"))
    return found + [c for c in own if c not in found]


def build(cls, cfg, *, max_params=None):
    """cls from cfg: float32, eager attention, seeded, eval mode, norm weights moved off their
    initial value (Gemma's 0, others' 1) so that a mistake in applying them shows."""
    if max_params is not None:
        with torch.device("meta"):
            n = sum(p.numel() for p in cls._from_config(cfg, attn_implementation="eager")
                    .parameters())
        if n > max_params:
            raise LookupError(f"{cls.__name__}: {n} parameters (the config keeps sizes "
                              f"GENERIC_TINY does not set)")
    torch.manual_seed(0)
    model = cls._from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    return model


class RopeOps(TorchDispatchMode):
    """Counts the calls of rope_ext's ops (torch.ops.rope.*) made inside it."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "rope":
            self.calls[func.name()] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting(mod, names):
    """The module's functions `names` (whatever they are now) wrapped to count their calls."""
    counts = collections.Counter()
    saved = {n: getattr(mod, n) for n in names}

    def wrap(n, fn):
        def counted(*args, **kwargs):
            counts[n] += 1
            return fn(*args, **kwargs)
        return counted

    for n, fn in saved.items():
        setattr(mod, n, wrap(n, fn))
    try:
        yield counts
    finally:
        for n, fn in saved.items():
            setattr(mod, n, fn)


def forward(model, ids, pos):
    """The logits of a causal LM, the last hidden state of a base model."""
    out = model(input_ids=ids, **({} if pos is None else {"position_ids": pos}))
    logits = getattr(out, "logits", None)
    return out.last_hidden_state if logits is None else logits


def run(model, ids, pos):
    """(output, {parameter: gradient or None}, rope ops called in the forward) of a fixed
    random projection of the output. (The ops are counted in the forward only: a dispatch
    mode doubles the time of a tiny model's step, and the gradients are compared anyway.)"""
    model.zero_grad(set_to_none=True)
    with RopeOps() as ops:
        y = forward(model, ids, pos)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=y.dtype)
    (y * w).sum().div(y.numel()).backward()
    grads = {n: None if p.grad is None else p.grad.detach().clone()
             for n, p in model.named_parameters()}
    return y.detach(), grads, ops.calls


def takes_position_ids(model):
    return "position_ids" in inspect.signature(model.forward).parameters


def patched_names(model_type):
    """The functions of model_type's module that rope_ext.hf.patched(model_type) replaces."""
    with hf.patched(model_type):
        return sorted(hf.report().patched.get(module_of(model_type), {}))


def reference(model_type, model, names, *, position_ids=True):
    """transformers' own run: (ids, pos, output, grads, calls of each of `names`)."""
    mod = sys.modules[module_of(model_type)]
    ids, pos = inputs()
    if not (position_ids and takes_position_ids(model)):
        pos = None
    with counting(mod, names) as n_hf:
        y, grads, ops = run(model, ids, pos)
    assert not ops, f"rope_ext ops ran unpatched: {dict(ops)}"
    return ids, pos, y, grads, dict(n_hf), names


def check_patched(model_type, model, ref):
    """Patched run against the reference; returns the calls of each patched function."""
    ids, pos, ref_y, ref_grads, n_hf, names = ref
    mod_name = module_of(model_type)
    mod = sys.modules[mod_name]
    assert sum(n_hf.values()) > 0, f"{model_type}: transformers' RoPE function never ran"
    with hf.patched(model_type) as r:
        fused = [c for c in r.fused if c.startswith(mod_name + ".")]
        assert mod_name in r or fused, (mod_name, list(r), r.fused)
        assert sorted(hf.report().patched.get(mod_name, {})) == names
        with counting(mod, names) as ours:
            y, grads, ops = run(model, ids, pos)
    # every rotation transformers made went through rope_ext: its replacement function (one op
    # call each), or the fused QK-norm + RoPE attention forward (one rms_norm_rope_qk each)
    n_fused = ops.pop("rope::rms_norm_rope_qk", 0)
    assert n_fused == 0 or fused
    assert sum(ours.values()) + n_fused == sum(n_hf.values()), (dict(ours), n_fused, n_hf)
    if not fused:
        assert dict(ours) == n_hf
    assert sum(ops.values()) == sum(ours.values()), (dict(ops), dict(ours))
    assert rel_err(y, ref_y) <= RTOL, rel_err(y, ref_y)
    assert ref_grads.keys() == grads.keys()
    none = sorted(n for n, g in ref_grads.items() if g is None)
    assert none == sorted(n for n, g in grads.items() if g is None)
    assert_grads_close({n: g for n, g in grads.items() if g is not None},
                       {n: g for n, g in ref_grads.items() if g is not None}, rel=RTOL)
    # unpatched again: transformers' own arithmetic, bit for bit
    assert not hf.is_patched(model_type)
    with torch.no_grad():
        back = forward(model, ids, pos)
    assert torch.equal(back, ref_y)
    return dict(ours), n_fused


@pytest.fixture(autouse=True)
def _clean_patch_state():
    hf.unpatch()
    yield
    hf.unpatch()


# ---------------------------------------------------------------------------------------------
# The families of the issue


@pytest.mark.parametrize("case", list(CASES))
def test_family(case):
    model_type, kwargs = CASES[case]
    cfg = config_of(model_type, {**BASE, **kwargs})
    model = build(model_classes(model_type, cfg)[0], cfg)
    assert type(model).__module__ == module_of(model_type)
    ref = reference(model_type, model, patched_names(model_type))
    assert ref[1] is not None, f"{model_type}'s model takes no position_ids"
    check_patched(model_type, model, ref)


# ---------------------------------------------------------------------------------------------
# Everything patch() patches


def _patched_modules():
    """The modules that rope_ext.hf.patch() patches once every discovered modeling module is
    imported (computed once per process at collection; nothing is left patched)."""
    hf.unpatch()
    try:
        hf.patch()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in registry.discovered():
                importlib.import_module(name)
        return sorted(hf.report().patched)
    finally:
        hf.unpatch()


PATCHED_MODULES = _patched_modules()
TYPES_OF = collections.defaultdict(list)  # module -> its model types
for _t in CONFIG_MAPPING_NAMES:
    TYPES_OF[module_of(_t)].append(_t)


class NotGeneric(Exception):
    """The model type does not build from GENERIC_TINY or does not run on input_ids alone."""


def generic_reference(model_type, names):
    """(model, reference run) of model_type from GENERIC_TINY (TINY's entry for the types of
    test_family), or NotGeneric with the reasons."""
    if model_type in TINY:
        kwargs = {**BASE, **TINY[model_type]}
    else:
        kwargs = {**GENERIC_TINY, **GENERIC_EXTRA.get(model_type, {})}
    why = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cfg = config_of(model_type, kwargs)
            classes = model_classes(model_type, cfg)
        except Exception as e:  # noqa: BLE001 (any failure: not buildable generically)
            raise NotGeneric(f"config: {type(e).__name__}: {str(e)[:300]}") from None
        if not classes:
            raise NotGeneric(f"no causal LM or model class takes {type(cfg).__name__}")
        for cls in classes:
            try:
                model = build(cls, cfg, max_params=MAX_PARAMS)
            except Exception as e:  # noqa: BLE001
                why.append(f"{cls.__name__}: {type(e).__name__}: {str(e)[:300]}")
                continue
            for position_ids in (True, False):
                try:
                    ref = reference(model_type, model, names, position_ids=position_ids)
                except Exception as e:  # noqa: BLE001
                    why.append(f"{cls.__name__}.forward: {type(e).__name__}: {str(e)[:300]}")
                    continue
                if sum(ref[4].values()) == 0:
                    why.append(f"{cls.__name__} runs on input_ids without calling {names}")
                    break
                return model, ref
    raise NotGeneric("; ".join(why))


def short(mod_name):
    return mod_name.split(".")[2]


def generic_runs(mod_name):
    """{model type: its reference run} for the types of mod_name that build generically and
    call a patched function on input_ids, and {model type: why not} for the others."""
    ran, why = {}, {}
    for model_type in TYPES_OF[mod_name]:
        names = patched_names(model_type)
        try:
            ran[model_type] = generic_reference(model_type, names)
        except NotGeneric as e:
            why[model_type] = str(e)
    return ran, why


# The patched modules where no model type builds from GENERIC_TINY as a causal LM or a base
# model that calls a patched RoPE function on input_ids alone. They are not tested here (the
# parametrized test leaves them out) and not counted as passing.
NOT_GENERIC = sorted([
    # only the vision tower's apply_rotary_pos_emb_vision is patched (the text RoPE is left
    # alone, or the text model lives in another module): it needs pixel_values and grid_thw
    "ernie4_5_vl_moe", "glm4v", "glm5_next", "glm_ocr", "kimi_k25", "qwen4_exp", "video_llama_3",
    "mlcd",
    # vision models: pixel_values, keypoints
    "efficientloftr", "lightglue", "pixtral",
    # composite vision-language configs: the flat sizes do not reach their sub-configs (the
    # defaults are billions of parameters) and no class takes the text config alone
    "exaone4_5", "idefics", "paddleocr_vl", "phi4_multimodal",
    # audio: input_features / audio codes / waveforms (voxtral_realtime_text, the one text
    # type, does not even make a config: transformers 5.18 finds no VoxtralRealtimeTextModel)
    "glmasr", "kyutai_speech_to_text", "lasr", "mimi", "moonshine_streaming",
    "nemotron3_diarization", "neucodec", "voxtral_realtime", "xcodec2",
    # encoder-decoders: decoder inputs and encoder outputs besides input_ids
    "dia", "moonshine", "t5gemma", "t5gemma2",
    # time series (past_values), protein structure and protein-text composites
    "timesfm2_5", "esmfold2", "evolla",
])


@pytest.mark.parametrize("mod_name", [m for m in PATCHED_MODULES if short(m) not in NOT_GENERIC],
                         ids=short)
def test_every_patched_module(mod_name):
    """Every model type of a patched module that builds generically: patched() gives
    transformers' logits and gradients, through rope_ext's op (check_patched)."""
    ran, why = generic_runs(mod_name)
    assert ran, (f"no model type of {mod_name} builds from GENERIC_TINY and runs on input_ids: "
                 f"{why} (fix GENERIC_EXTRA, or add it to NOT_GENERIC with the reason)")
    for model_type, (model, ref) in ran.items():
        check_patched(model_type, model, ref)


def test_not_generic_list_is_exact():
    """NOT_GENERIC is exactly the patched modules none of whose model types builds from
    GENERIC_TINY and calls a patched function on input_ids (the unpatched run of each type)."""
    not_generic = sorted(short(m) for m in PATCHED_MODULES if not generic_runs(m)[0])
    assert not_generic == NOT_GENERIC
