"""The int8 ops: thin wrappers over torch.ops.peft_ext, fake kernels for
tracing, autograd formulas, and the conversion-time weight quantizer."""
import torch

from .. import _C  # noqa: F401  (loads the library and registers the ops)

_ops = torch.ops.peft_ext

def quantize_weight(weight: torch.Tensor):
    """Symmetric per-output-channel int8: scale = absmax / 127, q = round(w / scale).

    Runs once at conversion time, on the weight's own device. An all-zero row
    gets scale 0 and q 0 (no division by zero).
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = torch.round(w * inv[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def quantize_per_token(x: torch.Tensor):
    """x[..., K] -> (int8 [M, K], float32 scales [M]), M = prod(x.shape[:-1])."""
    return _ops.quantize_per_token(x)


def int8_linear(x, weight, weight_scale, bias=None):
    """W8A8: quantize x per token, int8 GEMM with exact int32 sums, rescale and add bias."""
    return _ops.int8_linear(x, weight, weight_scale, bias)


def int8_linear_weight_only(x, weight, weight_scale, bias=None):
    """x stays float; int8 weights are dequantized inside the kernel."""
    return _ops.int8_linear_weight_only(x, weight, weight_scale, bias)


def int8_pack_weight(weight):
    """The int8 weight prepacked for the CPU kernels (a derived int8 tensor of
    about N * K + 4 * N bytes, valid on every CPU ISA tier); pass it to int8_linear_packed."""
    return _ops.int8_pack_weight(weight)


def int8_linear_packed(x, weight, weight_scale, bias, packed):
    """int8_linear with the prepacked weight (packed must come from int8_pack_weight(weight))."""
    return _ops.int8_linear_packed(x, weight, weight_scale, bias, packed)


def int8_dequantize(weight, weight_scale, dtype=torch.float32):
    return _ops.int8_dequantize(weight, weight_scale, dtype)


def int8_grad_input(grad, weight, weight_scale):
    """grad[..., N] @ (weight * weight_scale[:, None]) -> [..., K] in grad's dtype,
    read from the int8 weight: the backward of both int8 linear ops, without
    the float copy of the weight that grad @ int8_dequantize(W) allocates."""
    return _ops.int8_grad_input(grad, weight, weight_scale)


def _rows(x):
    m = 1
    for s in x.shape[:-1]:
        m = m * s
    return m


@torch.library.register_fake("peft_ext::quantize_per_token")
def _quantize_per_token_fake(x):
    m = _rows(x)
    return x.new_empty((m, x.shape[-1]), dtype=torch.int8), x.new_empty((m,), dtype=torch.float32)


def _linear_fake(x, weight, weight_scale, bias):
    torch._check(x.shape[-1] == weight.shape[1], lambda: "x and weight disagree on in_features")
    torch._check(weight_scale.shape[0] == weight.shape[0], lambda: "weight_scale has the wrong size")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


torch.library.register_fake("peft_ext::int8_linear")(_linear_fake)
torch.library.register_fake("peft_ext::int8_linear_weight_only")(_linear_fake)


@torch.library.register_fake("peft_ext::int8_linear_packed")
def _linear_packed_fake(x, weight, weight_scale, bias, packed):
    return _linear_fake(x, weight, weight_scale, bias)


@torch.library.register_fake("peft_ext::int8_pack_weight")
def _int8_pack_weight_fake(weight):
    n, k = weight.shape
    panels = (n + 15) // 16
    return weight.new_empty((64 + panels * 64 * ((k + 3) // 4) + 64 * panels,), dtype=torch.int8)


@torch.library.register_fake("peft_ext::int8_dequantize")
def _int8_dequantize_fake(weight, weight_scale, dtype):
    return weight.new_empty(weight.shape, dtype=dtype)


@torch.library.register_fake("peft_ext::int8_grad_input")
def _int8_grad_input_fake(grad, weight, weight_scale):
    torch._check(grad.shape[-1] == weight.shape[0], lambda: "grad and weight disagree on out_features")
    return grad.new_empty((*grad.shape[:-1], weight.shape[1]))


def _linear_setup_context(ctx, inputs, output):
    x, weight, weight_scale, bias = inputs[:4]
    ctx.n_inputs = len(inputs)
    ctx.save_for_backward(weight, weight_scale)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _linear_backward(ctx, grad):
    # The int8 weight is frozen; dynamic activation quantization is treated as
    # the identity (straight-through), so both modes share this formula.
    weight, weight_scale = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = int8_grad_input(grad, weight, weight_scale)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return (grad_x, None, None, grad_bias) + (None,) * (ctx.n_inputs - 4)


for _name in ("peft_ext::int8_linear", "peft_ext::int8_linear_weight_only", "peft_ext::int8_linear_packed"):
    torch.library.register_autograd(_name, _linear_backward, setup_context=_linear_setup_context)
