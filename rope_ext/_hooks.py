"""What calling a module runs besides its forward: a drop-in that computes a module's work
without calling it (rope_ext.hf's and rope_ext.diffusers' fused QK-norm + RoPE) stands in for
a call only when the answer is nothing."""

from typing import Iterable, Optional

import torch

# torch's global module hooks (one dict object each, filled and emptied in place)
_GLOBAL_HOOKS = tuple(getattr(torch.nn.modules.module, name) for name in (
    "_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_pre_hooks",
    "_global_backward_hooks"))


def skipped_by_standing_in(modules: Iterable[torch.nn.Module], verified_forwards) -> Optional[str]:
    """Why computing these modules' work without calling them would skip something, or None.

    Something is skipped when a module has a hook (forward pre-hook, forward hook, backward
    pre-hook, full backward hook: tensor parallel's gradient all-reduce, PEFT, logging), when
    a global module hook is registered, or when a module's forward is not one of
    ``verified_forwards`` (another class, or a forward set on the instance). Without any, this
    is a few attribute reads (guards under torch.compile)."""
    for m in modules:
        if m._forward_pre_hooks or m._forward_hooks or m._backward_pre_hooks or m._backward_hooks:
            return "a hook is registered on its q/k norm module"
        if "forward" in m.__dict__ or type(m).forward not in verified_forwards:
            return f"its {type(m).__name__} is not a class verified at patch time"
    if any(_GLOBAL_HOOKS):
        return "a global module hook is registered (torch.nn.modules.module)"
    return None
