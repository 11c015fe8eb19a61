"""torch.export and AOTInductor: a model using the ops exports, saves, loads and compiles to an
AOTInductor package, and a fresh process (which imports rope_ext first: that registers the ops)
loads each and gets the same outputs as eager."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import rope_ext

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


class Attention(torch.nn.Module):
    """q/k projections, RoPE on both (fused and single), the fused QK-RMSNorm + RoPE (Qwen3's
    per-head norm), a dot-product score."""

    def __init__(self, heads=4, kv_heads=2, head_dim=16, max_positions=64):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q = torch.nn.Linear(32, heads * head_dim, bias=False)
        self.k = torch.nn.Linear(32, kv_heads * head_dim, bias=False)
        self.rope = rope_ext.RotaryEmbedding(head_dim, rotary_dim=12, max_positions=max_positions)
        self.q_norm = torch.nn.Parameter(torch.rand(head_dim) + 0.5)
        self.k_norm = torch.nn.Parameter(torch.rand(head_dim) + 0.5)

    def forward(self, x, positions):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.head_dim)
        k = self.k(x).view(b, s, self.kv_heads, self.head_dim)
        q, k = self.rope(q, k, positions)
        k2 = rope_ext.apply_rope(k, self.rope.cos, self.rope.sin, positions, interleaved=True)
        qn, kn = rope_ext.rms_norm_rope_qk(q, k, self.rope.cos, self.rope.sin, positions,
                                           q_weight=self.q_norm, k_weight=self.k_norm)
        return torch.einsum("bshd,bthd->bhst", q[:, :, :self.kv_heads] + qn[:, :, :self.kv_heads],
                            k + k2 + kn)


# Where the tensors live (not a kernel choice: the exported program runs the op as compiled).
TENSOR_DEVICES = pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.needs_gpu)])


def _model_and_inputs(device="cpu"):
    torch.manual_seed(0)
    model = Attention().eval().to(device)
    x = torch.randn(2, 5, 32, device=device)
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 9, 11, 13, 63]], device=device)
    return model, (x, positions)


def _run_fresh(code, tmp_path):
    """Runs `code` in a new interpreter; returns its stdout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


@TENSOR_DEVICES
def test_export_save_load_in_a_fresh_process(tmp_path, device):
    model, args = _model_and_inputs(device)
    expected = model(*args)
    exported = torch.export.export(model, args)
    assert any("rope.apply" in str(n.target) for n in exported.graph.nodes)
    assert any("rope.rms_norm_rope_qk" in str(n.target) for n in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(*args), expected, rtol=0, atol=0)
    path = tmp_path / "attention.pt2"
    torch.export.save(exported, path)
    torch.save({"args": args, "expected": expected}, tmp_path / "io.pt")
    _run_fresh(f"""
        import torch
        import rope_ext  # registers torch.ops.rope before the program is loaded
        io = torch.load({str(tmp_path / 'io.pt')!r})
        program = torch.export.load({str(path)!r})
        torch.testing.assert_close(program.module()(*io["args"]), io["expected"], rtol=0, atol=0)
        print("ok")
    """, tmp_path)


def test_export_with_dynamic_sequence_length():
    model, (x, positions) = _model_and_inputs()
    seq = torch.export.Dim("seq", min=2, max=64)
    exported = torch.export.export(model, (x, positions),
                                   dynamic_shapes={"x": {1: seq}, "positions": {1: seq}})
    x7, pos7 = torch.randn(2, 7, 32), torch.arange(7).expand(2, -1)
    torch.testing.assert_close(exported.module()(x7, pos7), model(x7, pos7), rtol=0, atol=0)


@pytest.mark.skipif(not hasattr(torch, "_inductor") or sys.platform != "linux",
                    reason="AOTInductor packages are built on Linux")
@TENSOR_DEVICES
def test_aot_inductor_package_loads_and_runs_in_a_fresh_process(tmp_path, device):
    model, args = _model_and_inputs(device)
    expected = model(*args)
    exported = torch.export.export(model, args)
    package = torch._inductor.aoti_compile_and_package(
        exported, package_path=str(tmp_path / "attention.pt2"))
    torch.save({"args": args, "expected": expected}, tmp_path / "io.pt")
    _run_fresh(f"""
        import torch
        import rope_ext  # the package calls torch.ops.rope.*: register them first
        io = torch.load({str(tmp_path / 'io.pt')!r})
        runner = torch._inductor.aoti_load_package({package!r})
        got = runner(*io["args"])
        torch.testing.assert_close(got, io["expected"], rtol=1e-5, atol=1e-5)
        print("ok")
    """, tmp_path)
