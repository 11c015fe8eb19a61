"""Loads the C++ ops and registers their fake kernels.

The fake kernels (shapes for torch.compile, export and meta tensors) live here,
next to the Python wrappers; they run only while tracing. The autograd formulas
are in C++ (csrc/rope_registration.cpp) so that an eager call runs no Python on its way.
"""

import os

import torch

# ROPE_EXT_LIBRARY points at another build of the library (a sanitizer build, say)
# to load instead of the installed one; loading it registers the ops.
_library = os.environ.get("ROPE_EXT_LIBRARY")


def _built_for():
    try:
        from rope_ext._build_info import CUDA_VERSION, TORCH_VERSION
    except ImportError:
        return None, "an unknown torch (no rope_ext/_build_info.py)"
    return TORCH_VERSION, f"torch {TORCH_VERSION}" + (f" (CUDA {CUDA_VERSION})" if CUDA_VERSION
                                                      else "")


def _found():
    return f"torch {torch.__version__}" + (f" (CUDA {torch.version.cuda})" if torch.version.cuda
                                           else "")


def _major_minor(version):
    return tuple(version.split("+")[0].split(".")[:2])


# torch's C++ ABI holds only within one minor release: a binary built for another one may
# load and then fail in any call, so it is refused here, before it is loaded.
_built_version, _built = _built_for()
if _built_version is not None and _major_minor(_built_version) != _major_minor(torch.__version__):
    raise ImportError(
        f"rope_ext's compiled library was built against {_built} but this environment has "
        f"{_found()}: a binary loads only beside the torch release it was built for. Install the "
        "rope_ext built for this torch, or rebuild it here with `pip install --no-build-isolation .` "
        "(or `make build`).")

try:
    if _library:
        torch.ops.load_library(_library)
    else:
        from rope_ext import _C  # noqa: F401
except (ImportError, OSError) as e:  # only on a broken or mismatched install
    raise ImportError(
        f"rope_ext's compiled library was built against {_built} but this environment has "
        f"{_found()}, and it could not be loaded: {e}. A binary loads only beside the torch it "
        "was built for: install the rope_ext built for this torch, or rebuild it here with "
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
def _apply_fake(x, cos, sin, positions=None, interleaved=False, inverse=False,
                inv_freq=None, attention_factor=1.0):
    _check_devices(x, "x", cos=cos, sin=sin, positions=positions, inv_freq=inv_freq)
    return torch.empty_like(x)


@torch.library.register_fake("rope::apply_")
def _apply_inplace_fake(x, cos, sin, positions=None, interleaved=False, inverse=False,
                inv_freq=None, attention_factor=1.0):
    _check_devices(x, "x", cos=cos, sin=sin, positions=positions, inv_freq=inv_freq)
    return None


@torch.library.register_fake("rope::apply_qk")
def _apply_qk_fake(q, k, cos, sin, positions=None, interleaved=False, inverse=False,
                inv_freq=None, attention_factor=1.0):
    _check_devices(q, "q", k=k, cos=cos, sin=sin, positions=positions, inv_freq=inv_freq)
    return torch.empty_like(q), torch.empty_like(k)


@torch.library.register_fake("rope::apply_qk_")
def _apply_qk_inplace_fake(q, k, cos, sin, positions=None, interleaved=False, inverse=False,
                inv_freq=None, attention_factor=1.0):
    _check_devices(q, "q", k=k, cos=cos, sin=sin, positions=positions, inv_freq=inv_freq)
    return None


def _rstd_fake(x, across_heads):
    shape = list(x.shape[:-1])
    if across_heads:
        shape[-1] = 1
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(shape, dtype=dtype)


@torch.library.register_fake("rope::rms_norm_rope_qk")
def _rms_norm_rope_qk_fake(q, k, cos, sin, positions, q_weight, k_weight, eps=1e-6,
                           across_heads=False, weight_offset=0.0, interleaved=False):
    _check_devices(q, "q", k=k, cos=cos, sin=sin, positions=positions, q_weight=q_weight,
                   k_weight=k_weight)
    return (torch.empty_like(q), torch.empty_like(k), _rstd_fake(q, across_heads),
            _rstd_fake(k, across_heads))


@torch.library.register_fake("rope::rms_norm_rope_qk_")
def _rms_norm_rope_qk_inplace_fake(q, k, cos, sin, positions, q_weight, k_weight, eps=1e-6,
                                   across_heads=False, weight_offset=0.0, interleaved=False):
    _check_devices(q, "q", k=k, cos=cos, sin=sin, positions=positions, q_weight=q_weight,
                   k_weight=k_weight)
    return None


@torch.library.register_fake("rope::rms_norm_rope_qk_backward")
def _rms_norm_rope_qk_backward_fake(grad_q, grad_k, q, k, cos, sin, positions, q_weight,
                                    k_weight, q_rstd, k_rstd, across_heads, weight_offset,
                                    interleaved):
    _check_devices(q, "q", k=k, grad_q=grad_q, grad_k=grad_k, cos=cos, sin=sin,
                   positions=positions, q_weight=q_weight, k_weight=k_weight)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(q_weight),
            torch.empty_like(k_weight))


# Autograd is registered in C++ (csrc/rope_registration.cpp): the backward of a rotation is
# the same op with `inverse` flipped, and no Python runs between a call and the kernel.

from rope_ext import _vmap  # noqa: E402,F401  (vmap rules; needs the ops registered above)



def _register_sharding_with_dtensor():
    """DTensor's sharding rules for the ops, registered when torch.distributed.tensor is
    loaded: importing it costs about two seconds, which users without DTensor never pay."""
    import importlib.abc
    import importlib.util
    import sys

    name = "torch.distributed.tensor"
    if name in sys.modules:
        from rope_ext import _sharding  # noqa: F401
        return

    class AfterDTensorImport(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname != name:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(fullname)
            if spec is None or spec.loader is None:
                return spec
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                from rope_ext import _sharding  # noqa: F401

            spec.loader.exec_module = exec_then_register
            return spec

    sys.meta_path.insert(0, AfterDTensorImport())


if torch.distributed.is_available():
    _register_sharding_with_dtensor()
