"""HF peft LoRA on peft_ext's patched layers (QLoRA-style: a frozen int8 or
sparse base that runs our kernels, float adapters that train).

Imported by `peft_ext` (integrations/_lazy.py) as soon as `peft` is imported
(never before: peft is optional and slow to import); importing it runs
`register()`, which plugs into peft's LoRA dispatcher:

- `get_peft_model(model, LoraConfig(target_modules=...))` wraps `Int8Linear` and
  `SparseLinear` like nn.Linear: names, regexes and "all-linear" find them
  (the output head stays excluded, as peft does for nn.Linear).
- the layers are built through peft's custom-module registration
  (`LoraConfig._register_custom_module`), the path its dispatcher runs first.
- merging (`merge_and_unload`, `merge_adapter`) writes into our buffers the
  right way (requantize / kept positions only); `unmerge` and `unload()`
  restore the base bit for bit.

Each layer stores its weight as [out_features, in_features] whatever it was
converted from (a transformers Conv1D included), so `fan_in_fan_out` is
always False here.
"""
import logging

import torch
from peft.tuners import tuners_utils
from peft.tuners.lora import LoraModel
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

from .. import formats
from ..nn import Int8Linear, SparseLinear
from ..ops.int8 import quantize_weight

logger = logging.getLogger(__name__)


class _PatchedLoraLinear(LoraLinear):
    """lora.Linear over a base whose weight is not a float Parameter: merging
    goes through `_merge_delta`, and unmerging restores the buffers saved at
    merge time (exact, where recomputing would round a second time)."""

    def __init__(self, base_layer, adapter_name, config, **kwargs):
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        self.fan_in_fan_out = False
        self._saved_base = []  # one dict of buffers per merged adapter, in merge order

    def _get_in_out_features(self, module):
        # peft's generic lookup would warn "Unsupported layer type" for ours.
        return module.in_features, module.out_features

    def _base_state(self):
        raise NotImplementedError

    def _restore_base(self, state):
        base = self.get_base_layer()
        with torch.no_grad():
            for name, t in state.items():
                getattr(base, name).copy_(t)

    def _merge_delta(self, delta):
        raise NotImplementedError

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names or []:
            if name not in self.lora_A:
                continue
            if name in self.lora_variant:
                raise NotImplementedError(f"{type(self).__name__} cannot merge LoRA variants "
                                          f"({type(self.lora_variant[name]).__name__}); plain LoRA only")
            if self.lora_bias[name] and base.bias is None:
                raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has "
                                   "no bias.")
            delta = self.get_delta_weight(name).detach().float()
            if safe_merge and not torch.isfinite(delta).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            state = self._base_state()
            if base.bias is not None:
                state["bias"] = base.bias.detach().clone()
            with torch.no_grad():
                self._merge_delta(delta)
                if self.lora_bias[name]:
                    base.bias += (self.lora_B[name].bias * self.scaling[name]).to(base.bias.dtype)
            self._saved_base.append(state)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            logger.warning("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            self.merged_adapters.pop()
            self._restore_base(self._saved_base.pop())

    def __repr__(self) -> str:
        return super().__repr__().replace("lora.Linear", f"lora.{type(self).__name__}", 1)


class Int8LoraLinear(_PatchedLoraLinear):
    """LoRA on an `Int8Linear`. The base runs the int8 kernels (both modes) and
    its backward multiplies by the int8 weight directly; only the adapters
    (fp32 / bf16) have gradients.

    Merging dequantizes the weight, adds the delta B @ A * scaling, and
    requantizes per output channel (scale = absmax / 127). Against the exact
    float sum W_q + delta (W_q the dequantized base), the merged weight is off
    by at most half a new quantization step per element:

        |W_merged[n, k] - (W_q[n, k] + delta[n, k])| <= max_k |W_q[n, :] + delta[n, :]| / 254

    on top of the base's own quantization error (the original float weight is
    gone; nothing can restore it). Unmerging restores the int8 weight and scales
    saved at merge time bit for bit.
    """

    def _base_state(self):
        base = self.get_base_layer()
        return {"weight": base.weight.clone(), "weight_scale": base.weight_scale.clone()}

    def _merge_delta(self, delta):
        base = self.get_base_layer()
        merged = base.weight.float() * base.weight_scale[:, None] + delta.to(base.weight.device)
        q, scale = quantize_weight(merged)
        base.weight.copy_(q)
        base.weight_scale.copy_(scale)


class SparseLoraLinear(_PatchedLoraLinear):
    """LoRA on a `SparseLinear`. The base runs the sparse kernels; only the
    adapters have gradients.

    Merging adds the delta at the stored (kept) positions only, so the sparsity
    pattern survives and the layer keeps its kernel; the delta at pruned
    positions is dropped. That dropped part is the merge's whole error: the
    merged layer computes x @ (W + M * delta)^T, M the kept-position mask, and
    differs from the unmerged one by x @ ((1 - M) * delta)^T (for 2:4, at
    least half the delta's entries). The stored values are rounded to their own
    dtype once. Unmerging restores the saved values bit for bit.
    """

    def _base_state(self):
        return {"values": self.get_base_layer().values.detach().clone()}

    def _merge_delta(self, delta):
        base = self.get_base_layer()
        values = base.values
        delta = delta.to(values.device)
        if base.pattern == "2:4":
            kept = delta.gather(1, formats.columns_24(base.indices, values.shape[1]))
        elif base.pattern == "unstructured":
            rows = torch.repeat_interleave(torch.arange(base.out_features, device=delta.device),
                                           base.crow.diff())
            kept = delta[rows, base.col.long()]
        else:
            bh, bw = base.block
            rows = torch.repeat_interleave(torch.arange(base.crow.numel() - 1, device=delta.device),
                                           base.crow.diff())
            tiles = delta.reshape(base.out_features // bh, bh, base.in_features // bw, bw).permute(0, 2, 1, 3)
            kept = tiles[rows, base.col.long()]
        values.data.copy_((values.detach().float() + kept).to(values.dtype))


LORA_LAYERS = {Int8Linear: Int8LoraLinear, SparseLinear: SparseLoraLinear}

_original_create_new_module = None
_original_all_linear = None


def _base_of(module):
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _create_new_module(lora_config, adapter_name, target, **kwargs):
    # Our layers go through the documented custom-module path (the dispatcher
    # peft tries first): registering on the config that meets one of them lets
    # users keep writing a plain LoraConfig.
    if isinstance(_base_of(target), tuple(LORA_LAYERS)):
        missing = {k: v for k, v in LORA_LAYERS.items() if k not in (lora_config._custom_modules or {})}
        if missing:
            lora_config._register_custom_module(missing)
    return _original_create_new_module(lora_config, adapter_name, target, **kwargs)


def _output_head_names(model):
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {name for name, m in model.named_modules() if head is not None and m is head}


def _maybe_include_all_linear_layers(peft_config, model):
    # peft's "all-linear" looks for nn.Linear and Conv1D only: add ours (not the
    # output head, nor anything already inside an adapter layer).
    is_all_linear = isinstance(getattr(peft_config, "target_modules", None), str) and \
        peft_config.target_modules.lower() == "all-linear"
    ours = set()
    if is_all_linear:
        inside = set()
        for prefix, module in model.named_modules():
            if isinstance(module, BaseTunerLayer):
                inside.update(f"{prefix}.{s}" if prefix else s for s, _ in module.named_modules() if s)
        ours = {name for name, m in model.named_modules() if isinstance(m, tuple(LORA_LAYERS))}
        ours -= inside | _output_head_names(model)
    peft_config = _original_all_linear(peft_config, model)
    if ours:
        peft_config.target_modules = set(peft_config.target_modules) | ours
    return peft_config


def register():
    """Teach HF peft's LoRA about Int8Linear and SparseLinear (idempotent).
    Runs by itself once peft is imported after `import peft_ext`."""
    global _original_create_new_module, _original_all_linear
    if _original_create_new_module is not None:
        return
    _original_create_new_module = LoraModel._create_new_module
    _original_all_linear = tuners_utils._maybe_include_all_linear_layers
    LoraModel._create_new_module = staticmethod(_create_new_module)
    tuners_utils._maybe_include_all_linear_layers = _maybe_include_all_linear_layers
    logger.debug("peft_ext: HF peft LoRA now wraps %s", ", ".join(c.__name__ for c in LORA_LAYERS))


# Importing this module is what registers (peft_ext imports it once peft is imported).
register()
