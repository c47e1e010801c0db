"""Masked fine-tuning: pruned weights stay zero under any torch optimizer.

The gradient hook zeroes the gradient of pruned weights (so momentum and Adam
moments stay zero there); the global optimizer hook re-applies the masks of
the parameters that optimizer holds after each step, because weight decay or
optimizers that write parameters directly could still move a zero.

Lifetime: a handle lives exactly as long as what owns it: the module it was
made for (stored in the module's __dict__, so copy.deepcopy and pickling of
the model carry it along), else the parameter itself. The registry of live
handles holds them weakly, so deleting a model frees its masks at once.
Masks are bool tensors applied with masked_fill: they follow the weight's
dtype (model.half(), .bfloat16()) and device (.cuda()), and a pruned position
becomes 0 even where the weight held inf or NaN.
"""
import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

_LIVE = weakref.WeakSet()  # every MaskHandle not yet removed whose owner is alive
_STEP_HOOK = None
# Attribute under which a module (or a parameter) keeps its handles alive.
OWNER_ATTR = "_peft_ext_masks"


def live_handles():
    """The MaskHandles currently in force (for tests and diagnostics)."""
    return list(_LIVE)


def handles_of(module):
    """The MaskHandles held by `module` or by its `weight` parameter."""
    found = list(module.__dict__.get(OWNER_ATTR, ()))
    weight = module.__dict__.get("_parameters", {}).get("weight")
    if weight is not None:
        found += list(getattr(weight, OWNER_ATTR, ()))
    return [h for h in found if h is not None]  # None: a handle whose weight was gone when copied


def _after_step(optimizer, args, kwargs):
    global _STEP_HOOK
    if not _LIVE and _STEP_HOOK is not None:
        _STEP_HOOK.remove()
        _STEP_HOOK = None
        return
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    with torch.no_grad():
        for h in list(_LIVE):
            p = h.param()
            if p is not None and id(p) in held:
                p.masked_fill_(h.pruned_on(p.device), 0)


class MaskHandle:
    """Keeps `param` zero where `keep` (bool or 0/1, same shape) is False
    until remove(). `module`: the module whose weight `param` is; the handle
    then lives (and is deep-copied) with it."""

    def __init__(self, param, keep, module=None):
        global _STEP_HOOK
        if tuple(keep.shape) != tuple(param.shape):
            raise ValueError(f"mask shape {tuple(keep.shape)} does not match the weight {tuple(param.shape)}")
        self.param = weakref.ref(param)
        self.pruned = (keep == 0).to(param.device)
        self._owner = weakref.ref(module if module is not None else param)
        # A frozen weight gets no gradient hook; the step hook still holds it.
        self._grad_hook = param.register_hook(self._mask_grad) if param.requires_grad else None
        owner = self._owner()
        held = owner.__dict__.setdefault(OWNER_ATTR, []) if module is not None else None
        if held is None:
            if not hasattr(param, OWNER_ATTR):
                setattr(param, OWNER_ATTR, [])
            held = getattr(param, OWNER_ATTR)
        held.append(self)
        _LIVE.add(self)
        if _STEP_HOOK is None:
            _STEP_HOOK = register_optimizer_step_post_hook(_after_step)

    def pruned_on(self, device):
        if self.pruned.device != device:  # the model moved (.cuda(), .to())
            self.pruned = self.pruned.to(device)
        return self.pruned

    def _mask_grad(self, grad):
        return grad.masked_fill(self.pruned_on(grad.device), 0)

    def remove(self):
        global _STEP_HOOK
        if self._grad_hook is not None:
            self._grad_hook.remove()
            self._grad_hook = None
        _LIVE.discard(self)
        owner = self._owner()
        held = None
        if owner is not None:
            held = owner.__dict__.get(OWNER_ATTR) if isinstance(owner, torch.nn.Module) else \
                getattr(owner, OWNER_ATTR, None)
        if held is not None and self in held:
            held.remove(self)
        if not _LIVE and _STEP_HOOK is not None:
            _STEP_HOOK.remove()
            _STEP_HOOK = None

    def __reduce__(self):
        # deepcopy / pickle of the owning module: rebuild the handle on the
        # copied parameter (the memo maps the original to its copy).
        p, owner = self.param(), self._owner()
        if p is None or owner is None or self not in _LIVE:
            return (_removed, ())
        module = owner if isinstance(owner, torch.nn.Module) else None
        return (_rebuild, (p, ~self.pruned, module))


def _rebuild(param, keep, module):
    return MaskHandle(param, keep, module)


def _removed():
    return None
