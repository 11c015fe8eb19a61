"""Loads the C++ ops and registers what torch needs around them.

The fake kernels (shapes for torch.compile and meta tensors) and the autograd
formulas live here rather than in C++, next to the Python wrappers, because
torch.library's Python registration is the supported way to make a custom op
traceable: one definition serves eager, compile and export.
"""

import os

import torch

# ROPE_EXT_LIBRARY points at another build of the library (a sanitizer build, say)
# to load instead of the installed one; loading it registers the ops.
_library = os.environ.get("ROPE_EXT_LIBRARY")
try:
    if _library:
        torch.ops.load_library(_library)
    else:
        from rope_ext import _C  # noqa: F401
except (ImportError, OSError) as e:  # pragma: no cover - only on a broken install
    raise ImportError(
        f"rope_ext's compiled library could not be loaded with torch {torch.__version__}: {e}. "
        "It is tied to the torch it was built against; rebuild it against this one with "
        "`pip install --no-build-isolation .` (or `make build`)."
    ) from e

ops = torch.ops.rope

# --- fake kernels: one layout rule, the C++ one: the output is empty_like(x) ---
# A meta tensor mixed with real ones also lands here, so the fake kernels check
# devices as the real ones do instead of returning a tensor on the wrong device.


def _check_devices(x, xname, **tensors):
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"rope: {name} is on {t.device} but {xname} is on {x.device}; "
                             f"move {name} to {x.device}")


@torch.library.register_fake("rope::apply")
def _apply_fake(x, cos, sin, positions=None, interleaved=False, inverse=False):
    _check_devices(x, "x", cos=cos, sin=sin, positions=positions)
    return torch.empty_like(x)


@torch.library.register_fake("rope::apply_")
def _apply_inplace_fake(x, cos, sin, positions=None, interleaved=False, inverse=False):
    _check_devices(x, "x", cos=cos, sin=sin, positions=positions)
    return None


@torch.library.register_fake("rope::apply_qk")
def _apply_qk_fake(q, k, cos, sin, positions=None, interleaved=False, inverse=False):
    _check_devices(q, "q", k=k, cos=cos, sin=sin, positions=positions)
    return torch.empty_like(q), torch.empty_like(k)


@torch.library.register_fake("rope::apply_qk_")
def _apply_qk_inplace_fake(q, k, cos, sin, positions=None, interleaved=False, inverse=False):
    _check_devices(q, "q", k=k, cos=cos, sin=sin, positions=positions)
    return None


# --- autograd: a rotation is orthogonal, so its gradient is the op itself with
# `inverse` flipped (SPEC.md section 1). The backward calls the differentiable op,
# so double backward needs nothing more. cos, sin and positions get no gradient.


def _setup_context(ctx, inputs, output):
    *_, cos, sin, positions, interleaved, inverse = inputs
    ctx.save_for_backward(cos, sin, positions)
    ctx.interleaved = interleaved
    ctx.inverse = inverse


def _apply_backward(ctx, grad):
    cos, sin, positions = ctx.saved_tensors
    grad_x = ops.apply(grad, cos, sin, positions, ctx.interleaved, not ctx.inverse)
    return grad_x, None, None, None, None, None


def _apply_qk_backward(ctx, grad_q, grad_k):
    cos, sin, positions = ctx.saved_tensors
    grad_q, grad_k = ops.apply_qk(grad_q, grad_k, cos, sin, positions, ctx.interleaved,
                                  not ctx.inverse)
    return grad_q, grad_k, None, None, None, None, None


torch.library.register_autograd("rope::apply", _apply_backward, setup_context=_setup_context)
torch.library.register_autograd("rope::apply_qk", _apply_qk_backward,
                                setup_context=_setup_context)
