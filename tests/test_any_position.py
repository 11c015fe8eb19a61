"""RotaryEmbedding at any position below 2**31, for every rope_type: a position past the
table gets exactly the row the table would hold, computed in the kernel from the float64
inverse frequencies (docs/api.md, RotaryEmbedding). Checked on the CPU kernel and on the
CUDA kernel's code through its host executor; tests/test_cuda.py repeats it on a GPU."""

import pytest
import torch

import reference as ref
import rope_ext

testing = torch.ops.rope_testing
D, R = 64, 48  # partial rotary: the tail passes through
FAR = [0, 5, 63, 64, 1000, 19999, 10**6, 2**31 - 1]  # the table holds 64 rows
SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 32,
                 "short_factor": [1.0] * (R // 2), "long_factor": [2.0] * (R // 2)},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
}


@pytest.fixture(params=["cpu", "cuda-host"])
def kernel(request):
    previous = testing.set_cpu_kernel("auto" if request.param == "cpu" else "cuda-host")
    yield request.param
    testing.set_cpu_kernel(previous)


def _exact_rows(rope, positions):
    """cos/sin of each token as cos_sin_table computes them (float64, rounded once)."""
    angle = positions.double()[..., None] * rope.inv_freq.double()
    a = rope.attention_factor
    return (a * torch.cos(angle)).float(), (a * torch.sin(angle)).float()


@pytest.mark.parametrize("scaling", list(SCALINGS))
def test_module_rotates_any_position_exactly(kernel, scaling):
    rope = rope_ext.RotaryEmbedding(D, rotary_dim=R, max_positions=64, scaling=SCALINGS[scaling])
    positions = torch.tensor([FAR, FAR[::-1]])
    q = torch.randn(2, len(FAR), 3, D)
    k = torch.randn(2, len(FAR), 1, D)
    qo, ko = rope(q, k, positions)
    cos, sin = _exact_rows(rope, positions)  # rope.inv_freq: the one this call used
    for x, y in ((q, qo), (k, ko)):
        ref.assert_pairs_close(y, ref.rope(x, cos.double(), sin.double()), x, R, False)
    # The gradient is the inverse rotation at the same far positions.
    qg = q.clone().requires_grad_()
    g = torch.randn_like(q)
    rope(qg, k, positions)[0].backward(g)
    ref.assert_pairs_close(qg.grad, ref.rope(g, cos.double(), sin.double(), inverse=True), g,
                           R, False)


def test_computed_rows_equal_the_table_rows(kernel):
    # A row computed in the kernel is the row a longer table holds: the outputs agree bit for
    # bit with the table path (both kernels round the same float32 row values).
    inv, attn = rope_ext.rope_frequencies(D, 500000.0)
    short = rope_ext.cos_sin_table(inv, 16, attn)
    long = rope_ext.cos_sin_table(inv, 20000, attn)
    x = torch.randn(1, 4, 2, D)
    positions = torch.tensor([[3, 16, 4095, 19999]])
    computed = rope_ext.apply_rope(x, *short, positions, inv_freq=inv, attention_factor=attn)
    tabled = rope_ext.apply_rope(x, *long, positions)
    assert torch.equal(computed, tabled)


def test_positions_past_2_31_or_negative_raise():
    rope = rope_ext.RotaryEmbedding(D, max_positions=64)
    q, k = torch.randn(1, 2, 1, D), torch.randn(1, 2, 1, D)
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 2\*\*31\)"):
        rope(q, k, torch.tensor([[0, 2**31]]))
    with pytest.raises(ValueError, match=r"positions must lie in \[0, "):
        rope(q, k, torch.tensor([[-1, 0]]))


def test_longer_sequence_without_positions_grows_the_table():
    rope = rope_ext.RotaryEmbedding(D, max_positions=8)
    q, k = torch.randn(1, 20, 2, D), torch.randn(1, 20, 1, D)
    qo, ko = rope(q, k)
    inv, attn = rope_ext.rope_frequencies(D)
    cos, sin = rope_ext.cos_sin_table(inv, 20, attn)
    assert torch.equal(qo, rope_ext.apply_rope(q, cos, sin))
    assert rope.cos.shape[0] == 20


def test_inv_freq_needs_positions_and_the_right_shape():
    inv, _ = rope_ext.rope_frequencies(D)
    cos, sin = rope_ext.cos_sin_table(inv, 8)
    x = torch.randn(1, 4, 1, D)
    with pytest.raises(ValueError, match=r"\binv_freq\b.*positions"):
        rope_ext.apply_rope(x, cos, sin, inv_freq=inv)
    with pytest.raises(TypeError, match=r"\binv_freq\b"):
        rope_ext.apply_rope(x, cos, sin, torch.arange(4), inv_freq=inv.float())
    with pytest.raises(ValueError, match=r"\binv_freq\b"):
        rope_ext.apply_rope(x, cos, sin, torch.arange(4), inv_freq=inv[:-1])
    with pytest.raises(ValueError, match=r"\battention_factor\b"):
        rope_ext.apply_rope(x, cos, sin, torch.arange(4), inv_freq=inv, attention_factor=0.0)


def test_compile_fullgraph_with_far_positions():
    torch._dynamo.reset()
    rope = rope_ext.RotaryEmbedding(D, max_positions=64)
    q, k = torch.randn(1, 3, 2, D), torch.randn(1, 3, 1, D)
    positions = torch.tensor([[1, 100000, 2**30]])
    compiled = torch.compile(rope, fullgraph=True)
    for got, want in zip(compiled(q, k, positions), rope(q, k, positions)):
        assert torch.equal(got, want)
