"""Int8Linear: a drop-in replacement for nn.Linear with int8 weights."""
import torch
from torch import nn

from .. import ops

MODES = ("dynamic", "weight_only")


def _is_conv1d(module) -> bool:
    # transformers' GPT-2 style Conv1D: weight [in, out], y = x @ W + b.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


class Int8Linear(nn.Module):
    """y = x @ W^T + b with W stored as per-output-channel int8.

    mode="dynamic" (W8A8) quantizes activations per token inside the kernel;
    mode="weight_only" keeps activations in float. Not an nn.Linear subclass on
    purpose: tools that add into `linear.weight.data` (LoRA merges) must not
    treat the int8 buffer as a float weight.

    Buffers: `weight` int8 [out_features, in_features], `weight_scale` float32
    [out_features]. `bias` is a trainable parameter. Gradients reach the input
    and the bias; the int8 weight is frozen.
    """

    def __init__(self, in_features, out_features, bias=True, mode="dynamic", device=None, dtype=None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.mode = mode
        self._source = "linear"
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.zeros(out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype or torch.float32))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear, mode="dynamic"):
        """Quantize an nn.Linear (or transformers Conv1D) into a new Int8Linear."""
        conv1d = _is_conv1d(linear)
        weight = linear.weight.t() if conv1d else linear.weight
        out_features, in_features = weight.shape
        has_bias = linear.bias is not None
        module = cls(in_features, out_features, bias=has_bias, mode=mode, device=weight.device,
                     dtype=weight.dtype)
        q, scale = ops.quantize_weight(weight)
        module.weight.copy_(q)
        module.weight_scale.copy_(scale)
        if has_bias:
            module.bias.data.copy_(linear.bias.detach())
            module.bias.requires_grad_(linear.bias.requires_grad)
        module._source = "conv1d" if conv1d else "linear"
        return module

    def dequantized_weight(self, dtype=None):
        dtype = dtype or (self.bias.dtype if self.bias is not None else torch.float32)
        return ops.int8_dequantize(self.weight, self.weight_scale, dtype)

    def to_linear(self):
        """An nn.Linear (or the original Conv1D) with the dequantized weight."""
        dtype = self.bias.dtype if self.bias is not None else torch.float32
        weight = self.dequantized_weight(dtype)
        device = self.weight.device
        if self._source == "conv1d":
            from transformers.pytorch_utils import Conv1D

            layer = Conv1D(self.out_features, self.in_features).to(device=device, dtype=dtype)
            layer.weight.data.copy_(weight.t())
        else:
            layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                              device=device, dtype=dtype)
            layer.weight.data.copy_(weight)
        if self.bias is not None:
            layer.bias.data.copy_(self.bias.detach())
        return layer

    def forward(self, x):
        if self.mode == "dynamic":
            return ops.int8_linear(x, self.weight, self.weight_scale, self.bias)
        return ops.int8_linear_weight_only(x, self.weight, self.weight_scale, self.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # copy_ would cast a float weight to int8 without a word: a float
        # checkpoint loaded into a patched model must fail loudly.
        weight = state_dict.get(prefix + "weight")
        if weight is not None and weight.dtype != torch.int8:
            raise TypeError(f"{prefix}weight is {weight.dtype} in the state dict but Int8Linear holds int8: "
                            "this is a float checkpoint; load it into the unpatched model, then patch it")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        # .half()/.bfloat16() set the compute dtype (the bias); the scales stay
        # float32 and the weight stays int8 whatever fn does to floats.
        super()._apply(fn, recurse)
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale = self.weight_scale.float()
        return self

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, mode={self.mode}")
