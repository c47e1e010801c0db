"""Pure-PyTorch references of every peft_ext op. Tests compare the kernels
against these; they also document the exact arithmetic each kernel performs."""
import torch


def quantize_per_token(x: torch.Tensor):
    x2 = x.reshape(-1, x.shape[-1]).float()
    absmax = x2.abs().amax(dim=1) if x2.shape[1] > 0 else x2.new_zeros(x2.shape[0])
    scale = absmax / 127
    inv = torch.where(absmax > 0, 1.0 / scale, torch.zeros_like(scale))
    q = torch.round(x2 * inv[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def int8_linear(x, weight, weight_scale, bias=None):
    q, s = quantize_per_token(x)
    # float64 holds every int32 sum exactly.
    acc = (q.double() @ weight.double().t()).float()
    y = acc * s[:, None] * weight_scale[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def int8_linear_weight_only(x, weight, weight_scale, bias=None):
    w = weight.float() * weight_scale[:, None]
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def int8_dequantize(weight, weight_scale, dtype=torch.float32):
    return (weight.float() * weight_scale[:, None]).to(dtype)
