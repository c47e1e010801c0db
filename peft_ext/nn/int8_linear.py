"""Int8Linear: a drop-in replacement for nn.Linear with int8 weights."""
import torch
from torch import nn

from .._modules import is_conv1d
from ..ops import int8 as ops

MODES = ("dynamic", "weight_only")


def _repack_after_load(module, incompatible_keys):
    module._repack()


class Int8Linear(nn.Module):
    """y = x @ W^T + b with W stored as per-output-channel int8.

    mode="dynamic" (W8A8) quantizes activations per token inside the kernel;
    mode="weight_only" keeps activations in float. Not an nn.Linear subclass on
    purpose: tools that add into `linear.weight.data` (LoRA merges) must not
    treat the int8 buffer as a float weight.

    Buffers: `weight` int8 [out_features, in_features], `weight_scale` float32
    [out_features]. `bias` is a trainable parameter. Gradients reach the input
    and the bias; the int8 weight is frozen.

    `compute_dtype` is the float dtype of the layer it came from (followed by
    .half() / .bfloat16() / .to(dtype)); to_linear() gives that dtype back, as
    well as the original weight's requires_grad. The output has the input's
    dtype; float64 input is computed in float32 (the int8 weight holds ~8
    bits) and returned as float64. Loading a state dict refuses a `weight` that
    is not int8 or comes without its `weight_scale` (strict or not): a float
    checkpoint must be loaded before patch().

    In dynamic mode on the CPU the weight is also kept prepacked for the
    kernels (`_packed`, about one more byte per weight plus 4 bytes per output
    feature; not in the state dict, not counted as a buffer). It is rebuilt at
    from_linear, load_state_dict and .to() time, and before a forward whenever
    the weight tensor was replaced or modified in place. Set `prepack = False`
    (on the class or one module) to save that memory at some speed (M >= 8).
    """

    compute_dtype = torch.float32  # class defaults: modules pickled before these existed
    weight_requires_grad = True
    prepack = True

    def __init__(self, in_features, out_features, bias=True, mode="dynamic", device=None, dtype=None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.mode = mode
        self._source = "linear"
        self.compute_dtype = dtype or torch.float32
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.zeros(out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype or torch.float32))
        else:
            self.register_parameter("bias", None)
        self._packed = self._packed_key = None
        self.register_load_state_dict_post_hook(_repack_after_load)

    def _weight_key(self):
        w = self.weight
        return (id(w), w.data_ptr(), w._version, w.device)

    def _repack(self):
        """Rebuild the prepacked weight (dynamic mode, CPU), or drop it."""
        w = self.weight
        if (self.prepack and self.mode == "dynamic" and w.device.type == "cpu" and w.dtype == torch.int8
                and w.dim() == 2):
            self._packed = ops.int8_pack_weight(w.contiguous())
            self._packed_key = self._weight_key()
        else:
            self._packed = self._packed_key = None

    @classmethod
    def from_linear(cls, linear, mode="dynamic"):
        """Quantize an nn.Linear (or transformers Conv1D) into a new Int8Linear."""
        conv1d = is_conv1d(linear)
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
        module.weight_requires_grad = linear.weight.requires_grad
        module._repack()
        return module

    def dequantized_weight(self, dtype=None):
        dtype = dtype or self.compute_dtype
        if dtype == torch.float64:  # the kernels write float32/bf16/fp16
            return ops.int8_dequantize(self.weight, self.weight_scale, torch.float32).double()
        return ops.int8_dequantize(self.weight, self.weight_scale, dtype)

    def to_linear(self):
        """An nn.Linear (or the original Conv1D) with the dequantized weight, in
        the compute dtype, with the original requires_grad flags."""
        dtype = self.compute_dtype
        weight = self.dequantized_weight(dtype)
        device = self.weight.device
        if self._source == "conv1d":
            # transformers is optional: only a layer that came from a Conv1D needs it.
            from transformers.pytorch_utils import Conv1D  # noqa: PLC0415

            layer = Conv1D(self.out_features, self.in_features).to(device=device, dtype=dtype)
            layer.weight.data.copy_(weight.t())
        else:
            layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                              device=device, dtype=dtype)
            layer.weight.data.copy_(weight)
        if self.bias is not None:
            layer.bias.data.copy_(self.bias.detach())
            layer.bias.requires_grad_(self.bias.requires_grad)
        layer.weight.requires_grad_(self.weight_requires_grad)
        return layer

    def forward(self, x):
        if x.device != self.weight.device:
            # The ops would trace a meta input through CPU weights instead of failing.
            raise RuntimeError(f"Int8Linear: input is on {x.device} but the weights are on "
                               f"{self.weight.device}; move the module or the input")
        if x.dtype == torch.float64:
            bias = None if self.bias is None else self.bias.float()
            return self._linear(x.float(), bias).double()
        return self._linear(x, self.bias)

    def _linear(self, x, bias):
        if self.mode == "dynamic":
            # Under torch.compile the plain-weight op runs (no repacking in a graph).
            if self.prepack and self.weight.device.type == "cpu" and not torch.compiler.is_compiling():
                if self._packed is None or self._packed_key != self._weight_key():
                    self._repack()
                return ops.int8_linear_packed(x, self.weight, self.weight_scale, bias, self._packed)
            return ops.int8_linear(x, self.weight, self.weight_scale, bias)
        return ops.int8_linear_weight_only(x, self.weight, self.weight_scale, bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        problems = state_dict_problems(state_dict, prefix)
        if problems:  # refuse before any buffer changes; torch raises them, strict or not
            error_msgs.extend(problems)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _apply(self, fn, recurse=True):
        # .half()/.bfloat16() set the compute dtype (the bias); the scales stay
        # float32 and the weight stays int8 whatever fn does to floats.
        super()._apply(fn, recurse)
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale = self.weight_scale.float()
        # What fn does to a tensor of the compute dtype (the bias is one; a
        # bias-free layer asks an empty tensor, already on the new device).
        probe = self.bias if self.bias is not None else None
        if probe is None:
            probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self.weight_scale.device))
        self.compute_dtype = probe.dtype
        self._repack()
        return self

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, mode={self.mode}")


def state_dict_problems(state_dict, prefix):
    """Why the entries under prefix cannot be an Int8Linear's, as load_state_dict
    error messages (empty when they can). A float weight would be truncated to
    int8 by copy_ and a weight without its scales is meaningless."""
    weight, scale = state_dict.get(prefix + "weight"), state_dict.get(prefix + "weight_scale")
    problems = []
    if weight is not None and weight.dtype != torch.int8:
        hint = ("a float checkpoint: load it before peft_ext.patch(), or convert the layer with "
                "Int8Linear.from_linear(linear)" if scale is None else
                "quantize it with peft_ext.ops.quantize_weight(), or use Int8Linear.from_linear(linear)")
        problems.append(f"'{prefix}weight' has dtype {weight.dtype}, but Int8Linear stores an int8 weight "
                        f"with its float32 'weight_scale'; this is {hint}")
    elif weight is not None and scale is None:
        problems.append(f"'{prefix}weight_scale' is missing beside the int8 '{prefix}weight': the weight is "
                        f"meaningless without its per-channel scales")
    if scale is not None and not scale.is_floating_point():
        problems.append(f"'{prefix}weight_scale' has dtype {scale.dtype}, expected float32")
    return problems
