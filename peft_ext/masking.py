"""Masked fine-tuning: pruned weights stay zero under any torch optimizer.

The gradient hook zeroes the gradient of pruned weights (so momentum and Adam
moments stay zero there); the global optimizer hook re-applies every live mask
after each step, because weight decay or optimizers that write parameters
directly could still move a zero.
"""
import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

_LIVE = {}  # id(handle) -> handle
_STEP_HOOK = None


def _after_step(optimizer, args, kwargs):
    with torch.no_grad():
        for h in list(_LIVE.values()):
            p = h.param()
            if p is None:
                h.remove()
            else:
                p.mul_(h.mask)


class MaskHandle:
    """Keeps `param` zero where `mask` (same shape) is False until remove()."""

    def __init__(self, param, mask):
        global _STEP_HOOK
        self.param = weakref.ref(param)
        self.mask = mask.to(device=param.device, dtype=param.dtype)
        # A frozen weight gets no gradient hook; the step hook still holds it.
        self._grad_hook = param.register_hook(lambda g: g * self.mask) if param.requires_grad else None
        _LIVE[id(self)] = self
        if _STEP_HOOK is None:
            _STEP_HOOK = register_optimizer_step_post_hook(_after_step)

    def remove(self):
        global _STEP_HOOK
        if self._grad_hook is not None:
            self._grad_hook.remove()
        _LIVE.pop(id(self), None)
        if not _LIVE and _STEP_HOOK is not None:
            _STEP_HOOK.remove()
            _STEP_HOOK = None
