"""Tiny random transformers models for the rope_ext.hf tests (tests/test_hf_dropin.py,
tests/test_hf_fused.py): built from a config of each family, nothing downloaded; their inputs;
and the comparison of logits and gradients between a patched and an unpatched run."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

# Small sizes with a realistic structure: 2 layers, GQA (4 q heads, 2 kv heads), head_dim 16.
COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, intermediate_size=128, vocab_size=128, max_position_embeddings=512,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6)
CONFIG_TYPE = {"gemma3": "gemma3_text", "qwen3_5": "qwen3_5_text",  # the text-only models
               "qwen3_5_moe": "qwen3_5_moe_text"}

# The families with a fused QK-norm attention (rope_ext.hf.FUSED_MODEL_TYPES): their tiny
# configs; the second layer slides (window 4 < seq): the sliding_window argument matters
FUSED_EXTRA = {
    "qwen3": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "olmo2": dict(),
    "gemma3": dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                   query_pre_attn_scalar=16, final_logit_softcapping=30.0),
    "olmo3": dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
    "apertus": dict(max_position_embeddings=16384),
    "glm4_moe": dict(use_qk_norm=True, partial_rotary_factor=0.5, first_k_dense_replace=2),
    "exaone4": dict(sliding_window=4, layer_types=["sliding_attention", "sliding_attention"]),
    # hybrid models: both layers full attention (their linear-attention layers take no RoPE)
    "qwen3_next": dict(layer_types=["full_attention"] * 2, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=32, shared_expert_intermediate_size=32),
    "qwen3_5": dict(layer_types=["full_attention"] * 2),
    "qwen3_5_moe": dict(layer_types=["full_attention"] * 2, num_experts=4,
                        num_experts_per_tok=2, moe_intermediate_size=32,
                        shared_expert_intermediate_size=32),
}



def tiny_model(fam, config=None, *, randomize_norms=False, dtype=torch.float32):
    """transformers' causal LM of family `fam` from COMMON updated by `config`, eager
    attention, seeded. randomize_norms: norm weights moved off their initial 1 (Gemma: 0), so
    that a mistake in how they are applied shows."""
    kwargs = {**COMMON, **(config or {})}
    if fam == "falcon":
        del kwargs["head_dim"]  # a read-only property there (hidden_size // heads = 16)
    cfg = AutoConfig.for_model(CONFIG_TYPE.get(fam, fam), **kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    # the module rope_ext.hf patches into
    assert type(model).__module__ == f"transformers.models.{fam}.modeling_{fam}"
    if randomize_norms:
        with torch.no_grad():
            g = torch.Generator().manual_seed(2)
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.5 * torch.randn(p.shape, generator=g))
    return model.to(dtype)


def inputs(batch=2, seq=9):
    """Token ids and position ids, each row at its own positions (as after left padding or in
    packed continuation)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, COMMON["vocab_size"], (batch, seq), generator=g)
    pos = torch.arange(seq)[None] + torch.tensor([[0], [37]])[:batch]
    return ids, pos


def rel_err(a, b):
    """Largest difference relative to b's largest element."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def grads_of(model, ids, pos, forward=None):
    """(logits, {parameter name: gradient}) of the language-model loss on ids."""
    model.zero_grad(set_to_none=True)
    out = (model if forward is None else forward)(ids, position_ids=pos, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return out.logits.detach(), grads


def assert_grads_close(ours, ref, rel):
    """Every parameter's gradient within rel of the largest element of transformers' own."""
    assert ours.keys() == ref.keys()
    for name in ref:
        g, r = ours[name], ref[name]
        assert g is not None and r is not None, name
        scale = float(r.abs().max())
        assert float((g.double() - r.double()).abs().max()) <= rel * scale + 1e-12, name
