"""The fused QK-norm + RoPE forward of rope_ext.hf keeps every hook of the norm modules it
stands in for (every family of rope_ext.hf.FUSED_MODEL_TYPES).

The fused op computes q_norm/k_norm inside rope_ext.rms_norm_rope_qk without calling the
modules, so a call with a hook on either module (or a global module hook, or a norm of
another class) runs transformers' own attention forward instead, which calls them. Checked
here on tiny random models, patched against unpatched (gradients within 1e-4 of the largest
element of each: a rotation rounded once instead of three times moves a small scalar gradient,
such as Apertus's activation parameters, by more than 1e-5 of itself):
a) a forward pre-hook, a forward hook and a full backward hook on each norm module fire
   exactly as often, with the same logits and gradients;
b) hooks that change what flows (an output scaled in a forward hook, an input gradient scaled
   in a full backward hook, an input shifted in a pre-hook) give transformers' results;
c) global module hooks and a norm module replaced by another class are honoured too;
d) rope_ext.hf.report() names the classes that fell back and why; without hooks the fused op
   runs (once per layer) and report() has no fallback;
e) under torch.compile (whole model) the hooks fire and the gradients equal eager's;
f) transformers' tensor-parallel backward (2 gloo ranks, the model's own TP plan, whose
   q_norm/k_norm are replicated_with_grad_allreduce: a full backward hook that sums the
   ranks' weight gradients) gives the unpatched gradients with the patch on.
"""

import importlib
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

import transformers

import rope_ext
import rope_ext.hf as hf
import tiny_models
from tiny_models import grads_of, inputs, rel_err

transformers.logging.set_verbosity_error()

FAMS = list(hf.FUSED_MODEL_TYPES)
MODULES = {f: importlib.import_module(f"transformers.models.{f}.modeling_{f}") for f in FAMS}
CLASS_NAME = {f: f"{MODULES[f].__name__}.{hf.FUSED_MODEL_TYPES[f].cls_name}" for f in FAMS}
EXTRA = tiny_models.FUSED_EXTRA


@pytest.fixture(autouse=True)
def _clean_patch_state():
    hf.unpatch()
    yield
    hf.unpatch()


@pytest.fixture
def op_calls(monkeypatch):
    calls = []
    real = rope_ext.rms_norm_rope_qk

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(rope_ext, "rms_norm_rope_qk", counting)
    return calls


def tiny_model(fam):
    return tiny_models.tiny_model(fam, EXTRA[fam], randomize_norms=True).train()


def norms(model):
    return [m for layer in model.model.layers for m in (layer.self_attn.q_norm,
                                                         layer.self_attn.k_norm)]


class Counter:
    """Counts the calls of each hook kind on each module it is registered on."""

    def __init__(self, modules):
        self.counts = {}
        self.handles = []
        for i, m in enumerate(modules):
            self.handles += [
                m.register_forward_pre_hook(self._count(i, "pre")),
                m.register_forward_hook(self._count(i, "forward")),
                m.register_full_backward_hook(self._count(i, "backward")),
            ]

    def _count(self, i, kind):
        def hook(*_):
            self.counts[(i, kind)] = self.counts.get((i, kind), 0) + 1
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _run(model, ids, pos, forward=None):
    logits, grads = grads_of(model, ids, pos, forward=forward)
    return logits, grads


@pytest.mark.parametrize("fam", FAMS)
def test_every_hook_on_the_norms_fires_as_without_the_patch(fam, op_calls):
    model = tiny_model(fam)
    ids, pos = inputs()
    counter = Counter(norms(model))
    ref_logits, ref_grads = _run(model, ids, pos)
    ref_counts = dict(counter.counts)
    assert len(ref_counts) == 3 * 4 and all(v == 1 for v in ref_counts.values())
    counter.counts.clear()
    hf.patch(fam)
    op_calls.clear()  # the patch-time probe's call
    logits, grads = _run(model, ids, pos)
    assert counter.counts == ref_counts
    assert op_calls == []  # every layer ran transformers' forward: the hooks are on its norms
    assert rel_err(logits, ref_logits) <= 1e-5
    tiny_models.assert_grads_close(grads, ref_grads, rel=1e-4)
    rep = hf.report()
    assert CLASS_NAME[fam] in rep.fused
    assert "hook" in rep.fallbacks[CLASS_NAME[fam]]

    counter.remove()  # no hook left: the fused op again, once per layer
    logits, grads = _run(model, ids, pos)
    assert len(op_calls) == 2
    assert rel_err(logits, ref_logits) <= 1e-5
    tiny_models.assert_grads_close(grads, ref_grads, rel=1e-4)


def _scale_output(module, args, output):
    return output * 2.0


def _scale_input_grad(module, grad_input, grad_output):
    return tuple(None if g is None else g * 3.0 for g in grad_input)


def _shift_input(module, args):  # not a scaling: an RMSNorm's output does not see one
    return (args[0] + 0.5,)


@pytest.mark.parametrize("kind", ["forward", "backward", "pre"])
@pytest.mark.parametrize("fam", FAMS)
def test_hooks_that_change_values_give_transformers_results(fam, kind, op_calls):
    """Each hook changes the result (checked against the model without it), and the patched
    model gives the unpatched one's logits and gradients with it."""
    model = tiny_model(fam)
    ids, pos = inputs()
    plain_logits, plain_grads = _run(model, ids, pos)
    handles = []
    for m in norms(model)[:2]:  # the first layer's q_norm and k_norm
        if kind == "forward":
            handles.append(m.register_forward_hook(_scale_output))
        elif kind == "backward":
            handles.append(m.register_full_backward_hook(_scale_input_grad))
        else:
            handles.append(m.register_forward_pre_hook(_shift_input))
    ref_logits, ref_grads = _run(model, ids, pos)
    changed = max(rel_err(ref_grads[n], plain_grads[n]) for n in plain_grads)
    assert changed > 1e-3  # the hook matters
    hf.patch(fam)
    op_calls.clear()  # the patch-time probe's call
    logits, grads = _run(model, ids, pos)
    assert op_calls == [torch.Size([2, 9, 4, 16])]  # layer 2 has no hook: fused
    assert rel_err(logits, ref_logits) <= 1e-5
    tiny_models.assert_grads_close(grads, ref_grads, rel=1e-4)
    for h in handles:
        h.remove()


@pytest.mark.parametrize("kind", ["forward_pre", "forward", "backward"])
def test_global_module_hooks_are_honoured(kind, op_calls):
    fam = "qwen3"
    model = tiny_model(fam)
    ids, pos = inputs()
    seen = []
    norm_ids = {id(m) for m in norms(model)}

    def hook(module, *_):
        if id(module) in norm_ids:
            seen.append(id(module))

    register = {"forward_pre": torch.nn.modules.module.register_module_forward_pre_hook,
                "forward": torch.nn.modules.module.register_module_forward_hook,
                "backward": torch.nn.modules.module.register_module_full_backward_hook}[kind]
    handle = register(hook)
    try:
        ref_logits, ref_grads = _run(model, ids, pos)
        ref_seen = list(seen)
        seen.clear()
        assert len(ref_seen) == 4
        hf.patch(fam)
        op_calls.clear()  # the patch-time probe's call
        logits, grads = _run(model, ids, pos)
    finally:
        handle.remove()
    assert seen == ref_seen and op_calls == []
    assert "global module hook" in hf.report().fallbacks[CLASS_NAME[fam]]
    assert rel_err(logits, ref_logits) <= 1e-5
    tiny_models.assert_grads_close(grads, ref_grads, rel=1e-4)


class OffsetRMSNorm(torch.nn.Module):
    """Another norm (an RMSNorm plus a constant): the fused op cannot stand in for it."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm
        self.weight = norm.weight
        self.variance_epsilon = getattr(norm, "variance_epsilon", None)
        self.eps = getattr(norm, "eps", None)

    def forward(self, x):
        return self.norm(x) + 0.25


@pytest.mark.parametrize("fam", FAMS)
def test_a_norm_replaced_by_another_module_is_called(fam, op_calls):
    model = tiny_model(fam)
    ids, pos = inputs()
    attn = model.model.layers[0].self_attn
    attn.q_norm = OffsetRMSNorm(attn.q_norm)
    ref_logits, ref_grads = _run(model, ids, pos)
    hf.patch(fam)
    op_calls.clear()  # the patch-time probe's call
    logits, grads = _run(model, ids, pos)
    assert len(op_calls) == 1  # layer 2 keeps its own norms: fused
    assert "not a class verified" in hf.report().fallbacks[CLASS_NAME[fam]]
    assert rel_err(logits, ref_logits) <= 1e-5
    tiny_models.assert_grads_close(grads, ref_grads, rel=1e-4)


def test_report_has_no_fallback_without_hooks(op_calls):
    model = tiny_model("qwen3")
    ids, pos = inputs()
    hf.patch("qwen3")
    op_calls.clear()  # the patch-time probe's call
    _run(model, ids, pos)
    assert len(op_calls) == 2
    rep = hf.report()
    assert rep.fallbacks == {} and CLASS_NAME["qwen3"] in rep.fused
    assert MODULES["qwen3"].__name__ in rep.patched
    hf.unpatch()
    rep = hf.report()
    assert rep.fused == () and not rep.patched and rep.fallbacks == {}


@pytest.mark.parametrize("fam", ["qwen3", "olmo2"])
def test_hooks_fire_under_torch_compile(fam):
    model = tiny_model(fam)
    ids, pos = inputs()
    counter = Counter(norms(model))
    ref_logits, ref_grads = _run(model, ids, pos)
    ref_counts = dict(counter.counts)
    counter.counts.clear()
    hf.patch(fam)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="aot_eager")
        logits, grads = _run(model, ids, pos, forward=compiled)
    finally:
        torch._dynamo.reset()
        counter.remove()
    assert counter.counts == ref_counts
    assert rel_err(logits, ref_logits) <= 1e-5
    tiny_models.assert_grads_close(grads, ref_grads, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# transformers' tensor-parallel backward test, with the patch on


TP_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    import torch.distributed as dist
    import transformers
    from transformers import AutoModelForCausalLM, DistributedConfig, set_seed
    import rope_ext.hf

    transformers.logging.set_verbosity_error()
    path, fam = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rope_ext.hf.patch(fam)
    set_seed(0)
    model_tp = AutoModelForCausalLM.from_pretrained(
        path, distributed_config=DistributedConfig(tp_plan="auto"), attn_implementation="eager")
    dist.barrier()
    rope_ext.hf.unpatch()   # the reference: transformers' own code, no TP
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    model.train(); model_tp.train()
    set_seed(42)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    labels = torch.randint(0, model.config.vocab_size, (2, 16))
    model(ids, labels=labels).loss.backward()
    rope_ext.hf.patch(fam)
    calls = []
    real = rope_ext.rms_norm_rope_qk
    rope_ext.rms_norm_rope_qk = lambda *a, **k: calls.append(1) or real(*a, **k)
    model_tp(ids, labels=labels).loss.backward()
    fallbacks = rope_ext.hf.report().fallbacks
    worst, checked = 0.0, 0
    for (name, p), (_, p_tp) in zip(model.named_parameters(), model_tp.named_parameters()):
        g, g_tp = p.grad, p_tp.grad
        if g is None or g_tp is None:
            continue
        g_tp = g_tp.full_tensor() if hasattr(g_tp, "full_tensor") else g_tp
        if g.shape != g_tp.shape:
            for dim in range(g.dim()):
                if g.size(dim) != g_tp.size(dim):
                    g = g.narrow(dim, rank * g_tp.size(dim), g_tp.size(dim))
                    break
        err = float((g - g_tp).abs().max() / g.abs().max().clamp_min(1e-30))
        if "norm" in name and "self_attn" in name:
            checked += 1
        worst = max(worst, err)
        assert err <= 1e-4, (name, err)
    print(f"rank {rank}: ok, {checked} q/k norm gradients, worst {worst:.2e}, "
          f"fused calls {len(calls)}, fallbacks {sorted(fallbacks)}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("fam", ["qwen3", "gemma3"])
def test_tensor_parallel_backward_gives_the_unpatched_gradients(fam, tmp_path):
    tiny_models.tiny_model(fam, EXTRA[fam], randomize_norms=True).save_pretrained(tmp_path)
    script = tmp_path / "tp_backward.py"
    script.write_text(TP_SCRIPT)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path), fam],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out[-4000:]
        assert f"rank {r}: ok, 4 q/k norm gradients" in out, out[-4000:]
        assert "fallbacks ['" + CLASS_NAME[fam] + "']" in out, out[-4000:]
