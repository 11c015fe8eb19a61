"""The RoPE implementations users run today, each behind one call signature.

Every implementation is built for one case (model shape, dtype, sequence) and
returns a function ``run(q, k) -> (q_out, k_out)`` over bshd tensors
``[batch, seq, heads, head_dim]``, so the benchmark times all of them alike.
Table construction happens at build time for all of them, as a model does once
per forward and not once per layer.
"""

import importlib.util
import os
import sys

import torch

import rope_ext


class Case:
    """One benchmark case: rotary_dim r of head_dim, positions start..start+seq-1."""

    def __init__(self, *, batch, seq, q_heads, k_heads, head_dim, rotary_dim, dtype, start=0,
                 base=10000.0):
        self.batch, self.seq, self.dtype = batch, seq, dtype
        self.q_heads, self.k_heads = q_heads, k_heads
        self.head_dim, self.rotary_dim = head_dim, rotary_dim
        self.start, self.base = start, base
        self.max_positions = start + seq

    def inputs(self, requires_grad=False, seed=0):
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(self.batch, self.seq, self.q_heads, self.head_dim, generator=g)
        k = torch.randn(self.batch, self.seq, self.k_heads, self.head_dim, generator=g)
        q, k = q.to(self.dtype), k.to(self.dtype)
        return q.requires_grad_(requires_grad), k.requires_grad_(requires_grad)

    def bytes_moved(self):
        """Bytes read and written by one rotation of q and k (the table is negligible)."""
        elems = self.batch * self.seq * (self.q_heads + self.k_heads) * self.head_dim
        return 2 * elems * torch.finfo(self.dtype).bits // 8

    def position_ids(self):
        return torch.arange(self.start, self.start + self.seq).expand(self.batch, -1)


def rope_ext_impl(case):
    inv_freq, attn = rope_ext.rope_frequencies(case.rotary_dim, case.base)
    cos, sin = rope_ext.cos_sin_table(inv_freq, case.max_positions, attn)
    positions = case.position_ids()
    return lambda q, k: rope_ext.apply_rope_qk(q, k, cos, sin, positions)


def _hf_tables(case):
    """cos/sin as transformers' Llama rotary module makes them: float32 angle, [b, s, r], x's dtype."""
    inv_freq = 1.0 / (case.base ** (torch.arange(0, case.rotary_dim, 2, dtype=torch.int64)
                                    .float() / case.rotary_dim))
    freqs = case.position_ids().float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(case.dtype), emb.sin().to(case.dtype)


def hf_eager_impl(case):
    """transformers' own apply_rotary_pos_emb; partial rotary sliced and concatenated as GPT-NeoX/Phi do."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cos, sin = _hf_tables(case)
    r = case.rotary_dim
    if r == case.head_dim:
        return lambda q, k: apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)

    def partial(q, k):
        qr, kr = apply_rotary_pos_emb(q[..., :r], k[..., :r], cos, sin, unsqueeze_dim=2)
        return torch.cat([qr, q[..., r:]], dim=-1), torch.cat([kr, k[..., r:]], dim=-1)

    return partial


def hf_compiled_impl(case):
    return torch.compile(hf_eager_impl(case), fullgraph=True, dynamic=False)


def _load_torchtune_rope():
    # torchtune's package __init__ insists on torchao, which the RoPE module never uses;
    # load the module file from the installed wheel directly.
    spec = importlib.util.find_spec("torchtune")
    if spec is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "modules", "position_embeddings.py")
    mspec = importlib.util.spec_from_file_location("torchtune_position_embeddings", path)
    module = importlib.util.module_from_spec(mspec)
    sys.modules[mspec.name] = module
    mspec.loader.exec_module(module)
    return module.RotaryPositionalEmbeddings


def torchtune_impl(case):
    """torchtune.modules.RotaryPositionalEmbeddings (interleaved pairs, full head_dim only)."""
    cls = _load_torchtune_rope()
    if cls is None or case.rotary_dim != case.head_dim:
        return None
    rope = cls(case.head_dim, max_seq_len=case.max_positions, base=case.base)
    pos = case.position_ids()
    return lambda q, k: (rope(q, input_pos=pos), rope(k, input_pos=pos))


def lucidrains_impl(case):
    """rotary-embedding-torch's RotaryEmbedding.rotate_queries_or_keys (partial rotary built in)."""
    try:
        from rotary_embedding_torch import RotaryEmbedding
    except ImportError:
        return None
    rope = RotaryEmbedding(dim=case.rotary_dim, theta=case.base, cache_if_possible=True)
    return lambda q, k: (rope.rotate_queries_or_keys(q, seq_dim=-3, offset=case.start),
                         rope.rotate_queries_or_keys(k, seq_dim=-3, offset=case.start))


def copy_impl(case):
    """A copy of the same bytes into fresh tensors: what any out-of-place op must at least cost."""
    return lambda q, k: (q.clone(), k.clone())


IMPLEMENTATIONS = {
    "rope_ext": rope_ext_impl,
    "HF eager": hf_eager_impl,
    "HF compile": hf_compiled_impl,
    "torchtune": torchtune_impl,
    "lucidrains": lucidrains_impl,
    "copy": copy_impl,
}
