"""Knowledge distillation losses: a plain one on logits, and a fused one on hidden states.

    loss_fn = DistillationLoss(temperature=2.0, alpha=0.5, kind="forward_kl")
    loss = loss_fn(student_logits, teacher_logits, labels)

    fused = FusedLinearDistillationLoss(temperature=2.0, alpha=0.5, kind="jsd")
    loss = fused(student_hidden, student_head.weight, teacher_hidden, teacher_head.weight, labels)

Both compute the same number (see `DistillationLoss` for the formula). The fused
one never holds the (tokens x vocab) logits: it walks the tokens in chunks and
computes the gradients of hidden states, head weight and bias chunk by chunk
during the forward, so its peak memory is a few (chunk x vocab) blocks plus the
weight gradient, whatever the number of tokens.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("batchmean", "sum", "none")
FUSED_REDUCTIONS = ("batchmean", "sum")

_FORMULA = """
    For one token (one row of logits) with student logits s, teacher logits t
    (vocabulary V), temperature T and label y:

        p = softmax(s / T)              student distribution at temperature T
        q = softmax(t / T)              teacher distribution at temperature T
        forward_kl:  KD = KL(q || p) = sum_v q_v (log q_v - log p_v)
        reverse_kl:  KD = KL(p || q) = sum_v p_v (log p_v - log q_v)
        jsd:         m  = (p + q) / 2  (the mixture, of the tempered distributions)
                     KD = 1/2 KL(q || m) + 1/2 KL(p || m)     (natural log, 0 <= KD <= log 2)
        CE = -log softmax(s)_y         (temperature 1: the hard labels see the raw logits)

        loss_token = alpha * c * KD + (1 - alpha) * CE,   c = T^2 if scale_by_t2 else 1

    T^2 keeps the size of the KD gradients independent of T (Hinton et al. 2015).
    A token counts when labels is None or its label != ignore_index; ignored
    tokens add nothing to either term. With N counted tokens (N = rows of a
    (batch, classes) input, or counted (batch, seq) positions of a
    (batch, seq, vocab) input, i.e. a mean over tokens, not over the batch):

        "batchmean": sum of loss_token over counted tokens / N   (0 when N == 0)
        "sum":       sum of loss_token over counted tokens
        "none":      loss_token per position, shape logits.shape[:-1], 0 at ignored ones

    The computation runs in float32 whatever the input dtype (float64 inputs stay
    float64); the loss is float32 (float64). The teacher gets no gradient.
    alpha = 1 needs no labels (labels=None: every token counts); alpha < 1 needs them.
    With alpha == 0 the KD term is skipped (its value would be multiplied by 0).
"""


def _check_config(temperature, alpha, kind, reduction, reductions):
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if reduction not in reductions:
        raise ValueError(f"reduction must be one of {reductions}, got {reduction!r}")


def _compute_dtype(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_float(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point (float32, bfloat16, float16, float64), got {t.dtype}")


def _check_labels(labels, lead_shape, alpha, device, arg="student_logits"):
    if labels is None:
        if alpha < 1:
            raise ValueError(f"labels are required when alpha < 1 (the CE term has weight 1 - alpha = {1 - alpha})")
        return None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (class indices), got {labels.dtype}")
    if tuple(labels.shape) != tuple(lead_shape):
        raise ValueError(f"labels must have shape {tuple(lead_shape)} ({arg} without its last dim), "
                         f"got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels must be on {device}, got {labels.device}")
    return labels.reshape(-1).long()


def _kd_per_token(s_scaled, t_scaled, kind):
    """KD of each row of tempered logits (rows, V) -> (rows,), differentiable w.r.t. s_scaled."""
    log_p = F.log_softmax(s_scaled, dim=-1)
    log_q = F.log_softmax(t_scaled, dim=-1)
    if kind == "forward_kl":
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    if kind == "reverse_kl":
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    return 0.5 * (log_q.exp() * (log_q - log_m)).sum(-1) + 0.5 * (log_p.exp() * (log_p - log_m)).sum(-1)


def _reduce(per_token, valid, reduction, lead_shape):
    if reduction == "none":
        return per_token.reshape(lead_shape)
    total = per_token.sum()
    if reduction == "sum":
        return total
    count = int(valid.sum()) if valid is not None else per_token.numel()
    return total / max(count, 1)


def distillation_loss(student_logits, teacher_logits, labels=None, *, temperature=2.0, alpha=0.5,
                      kind="forward_kl", reduction="batchmean", ignore_index=-100, scale_by_t2=True):
    _check_config(temperature, alpha, kind, reduction, REDUCTIONS)
    _check_float("student_logits", student_logits)
    _check_float("teacher_logits", teacher_logits)
    if student_logits.dim() not in (2, 3):
        raise ValueError("student_logits must be (batch, classes) or (batch, seq, vocab), "
                         f"got shape {tuple(student_logits.shape)}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits must have the shape of student_logits {tuple(student_logits.shape)}, "
                         f"got {tuple(teacher_logits.shape)}")
    if teacher_logits.device != student_logits.device:
        raise ValueError(f"teacher_logits must be on {student_logits.device}, got {teacher_logits.device}")
    lead_shape = student_logits.shape[:-1]
    vocab = student_logits.shape[-1]
    labels = _check_labels(labels, lead_shape, alpha, student_logits.device)

    dtype = _compute_dtype(student_logits, teacher_logits)
    s = student_logits.reshape(-1, vocab)
    t = teacher_logits.detach().reshape(-1, vocab)
    valid = None if labels is None else labels != ignore_index
    rows = None
    if valid is not None and not bool(valid.all()):
        # Drop ignored rows before any arithmetic: masking afterwards would still send
        # 0 * NaN = NaN gradients through a NaN (or inf) logit at an ignored position.
        rows = valid.nonzero().squeeze(1)
        s, t, labels = s[rows], t[rows], labels[rows]
    s = s.to(dtype)
    per_token = s.new_zeros(s.shape[0])
    if alpha > 0:
        c = temperature ** 2 if scale_by_t2 else 1.0
        per_token = per_token + (alpha * c) * _kd_per_token(s / temperature, t.to(dtype) / temperature, kind)
    if alpha < 1:
        per_token = per_token + (1.0 - alpha) * F.cross_entropy(s, labels, reduction="none")
    if rows is not None and reduction == "none":
        per_token = per_token.new_zeros(valid.shape).index_put((rows,), per_token)
    return _reduce(per_token, valid, reduction, lead_shape)


distillation_loss.__doc__ = ("Functional form of DistillationLoss: the distillation loss of student logits "
                             "against teacher logits.\n" + _FORMULA)


class DistillationLoss(nn.Module):
    __doc__ = ("""alpha * T^2 * KD(teacher || student) + (1 - alpha) * CE(student, labels), on logits.

    DistillationLoss(temperature=2.0, alpha=0.5, kind="forward_kl" | "reverse_kl" | "jsd",
                     reduction="batchmean" | "sum" | "none", ignore_index=-100, scale_by_t2=True)
    forward(student_logits, teacher_logits, labels=None)

    student_logits, teacher_logits: (batch, classes) or (batch, seq, vocab), the same
    shape, any float dtype; labels: integer, shape logits.shape[:-1].
""" + _FORMULA)

    def __init__(self, temperature=2.0, alpha=0.5, kind="forward_kl", reduction="batchmean",
                 ignore_index=-100, scale_by_t2=True):
        super().__init__()
        _check_config(temperature, alpha, kind, reduction, REDUCTIONS)
        self.temperature, self.alpha, self.kind = float(temperature), float(alpha), kind
        self.reduction, self.ignore_index, self.scale_by_t2 = reduction, int(ignore_index), bool(scale_by_t2)

    def forward(self, student_logits, teacher_logits, labels=None):
        return distillation_loss(student_logits, teacher_logits, labels, temperature=self.temperature,
                                 alpha=self.alpha, kind=self.kind, reduction=self.reduction,
                                 ignore_index=self.ignore_index, scale_by_t2=self.scale_by_t2)

    def extra_repr(self):
        return (f"temperature={self.temperature}, alpha={self.alpha}, kind={self.kind!r}, "
                f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, scale_by_t2={self.scale_by_t2}")


def _grad_student_logits(s, t, labels, valid, cfg):
    """Loss of each row and d(sum of row losses)/d(student logits) for one chunk, in closed form.

    s, t: (rows, V) raw logits in the compute dtype. With p = softmax(s/T), q = softmax(t/T):
    forward_kl: dKD/ds = (p - q) / T
    reverse_kl: dKD/ds = p * (a - sum(p * a)) / T,   a = log p - log q
    jsd:        dKD/ds = p * (b - sum(p * b)) / T,   b = (log p - log m) / 2
    CE:         dCE/ds = softmax(s) - onehot(y)
    """
    temperature, alpha, kind, scale = cfg
    rows = s.shape[0]
    loss = s.new_zeros(rows)
    grad = s.new_zeros(s.shape)
    if alpha > 0:
        log_p = F.log_softmax(s / temperature, dim=-1)
        log_q = F.log_softmax(t / temperature, dim=-1)
        p = log_p.exp()
        if kind == "forward_kl":
            q = log_q.exp()
            kd = (q * (log_q - log_p)).sum(-1)
            g = p - q
        elif kind == "reverse_kl":
            a = log_p - log_q
            kd = (p * a).sum(-1)
            g = p * (a - kd[:, None])
        else:
            log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
            b = 0.5 * (log_p - log_m)
            q = log_q.exp()
            kd = 0.5 * (q * (log_q - log_m)).sum(-1) + (p * b).sum(-1)
            g = p * (b - (p * b).sum(-1, keepdim=True))
        w = alpha * scale
        loss += w * kd
        grad += g.mul_(w / temperature)
    if alpha < 1:
        log_r = F.log_softmax(s, dim=-1)
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        loss -= (1 - alpha) * log_r.gather(1, safe[:, None]).squeeze(1)
        g = log_r.exp_()
        g.scatter_add_(1, safe[:, None], g.new_full((rows, 1), -1.0))
        grad += g.mul_(1 - alpha)
    if valid is not None:
        loss = torch.where(valid, loss, loss.new_zeros(()))
        grad = torch.where(valid[:, None], grad, grad.new_zeros(()))
    return loss, grad


def _default_chunk(tokens, hidden, vocab):
    # A (chunk x vocab) block about 4x the size of the (tokens x hidden) input: memory stays
    # at the input's scale, and every chunk passes over the head weights (and their
    # gradient) once, so fewer, larger chunks run faster. Measured on the CPU at 4096 tokens,
    # hidden 1024, vocab 32768 (one step, alternating with the unfused loss at 16.4-18.9 s):
    # chunk 128 took 21.4 s, 512 18.4-19.2 s, 1024 17.4-18.6 s; the peak stays below 1/4
    # of the unfused loss's.
    return max(1, min(tokens, 1 << max(0, math.ceil(math.log2(max(1, 4 * tokens * hidden // vocab))))))


class _FusedLinearDistillation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_h, s_w, s_b, t_h, t_w, t_b, t_logits, labels, valid, cfg, denom, chunk, grad_on):
        dtype = _compute_dtype(*(x for x in (s_h, s_w, t_h, t_w, t_logits) if x is not None))
        n = s_h.shape[0]
        # under no_grad only the loss is computed; the gradients would be thrown away
        need_h, need_w, need_b = (grad_on and ctx.needs_input_grad[i] for i in range(3))
        grad_h = torch.empty_like(s_h) if need_h else None
        grad_w = torch.zeros(s_w.shape, dtype=dtype, device=s_w.device) if need_w else None
        grad_b = torch.zeros(s_b.shape, dtype=dtype, device=s_b.device) if need_b else None
        total = torch.zeros((), dtype=dtype, device=s_h.device)
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            h = s_h[lo:hi]
            s = F.linear(h, s_w, s_b).to(dtype)
            if cfg[1] > 0:
                t = (t_logits[lo:hi] if t_logits is not None else F.linear(t_h[lo:hi], t_w, t_b)).to(dtype)
            else:
                t = None
            lab = labels[lo:hi] if labels is not None else None
            val = valid[lo:hi] if valid is not None else None
            loss, g = _grad_student_logits(s, t, lab, val, cfg)
            total += loss.sum()
            del s, t, loss
            if need_h:
                # the matmul in the head's dtype, as autograd would run it for F.linear(h, s_w)
                grad_h[lo:hi] = g.to(s_w.dtype) @ s_w
            if need_w:
                grad_w.addmm_(g.t(), h.to(dtype))
            if need_b:
                grad_b += g.sum(0)
            del g
        scale = 1.0 / denom
        ctx.save_for_backward(*(x for x in (grad_h, grad_w, grad_b) if x is not None))
        ctx.has = (need_h, need_w, need_b)
        ctx.scale = scale
        ctx.dtypes = (s_h.dtype, s_w.dtype, None if s_b is None else s_b.dtype)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        saved = iter(ctx.saved_tensors)
        out = []
        for has, dt in zip(ctx.has, ctx.dtypes):
            if not has:
                out.append(None)
                continue
            g = next(saved)
            out.append((g * (grad_out * ctx.scale).to(g.dtype)).to(dt))
        return (*out, *(None,) * 10)


def fused_linear_distillation_loss(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None,
                                   labels=None, *, student_bias=None, teacher_bias=None, teacher_logits=None,
                                   temperature=2.0, alpha=0.5, kind="forward_kl", reduction="batchmean",
                                   ignore_index=-100, scale_by_t2=True, chunk_size=None):
    _check_config(temperature, alpha, kind, reduction, FUSED_REDUCTIONS)
    _check_float("student_hidden", student_hidden)
    _check_float("student_weight", student_weight)
    if student_hidden.dim() < 2:
        raise ValueError(f"student_hidden must be (..., tokens, hidden), got shape {tuple(student_hidden.shape)}")
    if student_weight.dim() != 2:
        raise ValueError(f"student_weight must be 2-D (vocab, hidden), got shape {tuple(student_weight.shape)}")
    hidden = student_hidden.shape[-1]
    vocab = student_weight.shape[0]
    if student_weight.shape[1] != hidden:
        raise ValueError(f"student_weight must be (vocab, {hidden}) to match student_hidden's last dim, "
                         f"got {tuple(student_weight.shape)}")
    if student_weight.dtype != student_hidden.dtype:
        raise TypeError(f"student_weight must have student_hidden's dtype {student_hidden.dtype}, "
                        f"got {student_weight.dtype}")
    device = student_hidden.device
    for name, t in (("student_weight", student_weight), ("student_bias", student_bias),
                    ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
                    ("teacher_bias", teacher_bias), ("teacher_logits", teacher_logits)):
        if t is not None:
            _check_float(name, t)
            if t.device != device:
                raise ValueError(f"{name} must be on {device} (student_hidden's device), got {t.device}")
    if student_bias is not None:
        if student_bias.shape != (vocab,):
            raise ValueError(f"student_bias must have shape ({vocab},), got {tuple(student_bias.shape)}")
        if student_bias.dtype != student_hidden.dtype:
            raise TypeError(f"student_bias must have student_hidden's dtype {student_hidden.dtype}, "
                            f"got {student_bias.dtype}")
    lead_shape = student_hidden.shape[:-1]
    n = math.prod(lead_shape)
    by_hidden = teacher_hidden is not None or teacher_weight is not None
    if by_hidden and teacher_logits is not None:
        raise ValueError("give the teacher as teacher_hidden + teacher_weight or as teacher_logits, not both")
    if by_hidden:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("teacher_hidden and teacher_weight must be given together")
        if teacher_hidden.shape[:-1] != lead_shape:
            raise ValueError(f"teacher_hidden must have leading shape {tuple(lead_shape)} like student_hidden, "
                             f"got {tuple(teacher_hidden.shape)}")
        if teacher_weight.dim() != 2 or teacher_weight.shape != (vocab, teacher_hidden.shape[-1]):
            raise ValueError(f"teacher_weight must be ({vocab}, {teacher_hidden.shape[-1]}) (student vocab, "
                             f"teacher hidden), got {tuple(teacher_weight.shape)}")
        if teacher_weight.dtype != teacher_hidden.dtype:
            raise TypeError(f"teacher_weight must have teacher_hidden's dtype {teacher_hidden.dtype}, "
                            f"got {teacher_weight.dtype}")
        if teacher_bias is not None and (teacher_bias.shape != (vocab,) or teacher_bias.dtype != teacher_weight.dtype):
            raise ValueError(f"teacher_bias must have shape ({vocab},) and dtype {teacher_weight.dtype}, "
                             f"got {tuple(teacher_bias.shape)} {teacher_bias.dtype}")
    elif teacher_logits is not None:
        if teacher_logits.shape != (*lead_shape, vocab):
            raise ValueError(f"teacher_logits must have shape {(*lead_shape, vocab)}, got {tuple(teacher_logits.shape)}")
        if teacher_bias is not None:
            raise ValueError("teacher_bias goes with teacher_weight, not with teacher_logits")
    elif alpha > 0:
        raise ValueError("the teacher is missing: give teacher_hidden + teacher_weight (or teacher_logits)")
    labels = _check_labels(labels, lead_shape, alpha, device, arg="student_hidden")
    if chunk_size is None:
        chunk_size = _default_chunk(n, hidden, vocab)
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")

    valid = None if labels is None else labels != ignore_index
    count = int(valid.sum()) if valid is not None else n
    denom = float(max(count, 1)) if reduction == "batchmean" else 1.0
    cfg = (float(temperature), float(alpha), kind, float(temperature) ** 2 if scale_by_t2 else 1.0)
    detach = (lambda x: None if x is None else x.detach().reshape(-1, x.shape[-1]))
    return _FusedLinearDistillation.apply(
        student_hidden.reshape(n, hidden), student_weight, student_bias,
        detach(teacher_hidden), None if teacher_weight is None else teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(), detach(teacher_logits),
        labels, valid, cfg, denom, chunk_size, torch.is_grad_enabled())


fused_linear_distillation_loss.__doc__ = """DistillationLoss computed from hidden states and head weights.

    student_hidden (..., H_s) with student_weight (V, H_s) [and student_bias (V,)]:
    student logits = student_hidden @ student_weight.T + student_bias.
    The teacher: teacher_hidden (..., H_t) with teacher_weight (V, H_t) [and
    teacher_bias], or teacher_logits (..., V) (these are already tokens x vocab).
    labels: integer, shape student_hidden.shape[:-1]. reduction: "batchmean" or "sum".
    chunk_size: tokens per chunk; default about 4 * tokens * H_s / V (a power of two),
    so a (chunk x V) block is about 4x the size of the hidden states.

    The loss is exactly DistillationLoss's (formula below) on those logits.
    The student logits are never held for all tokens: each chunk's loss and the
    gradients w.r.t. hidden states, weight and bias are computed during the
    forward (the forward does the backward's matmuls too); backward only scales
    them by the incoming gradient. Peak extra memory: a few (chunk x V) blocks,
    the weight gradient (V x H_s, float32) and the hidden gradient. The weight
    gradient is accumulated in float32 and cast to the weight's dtype.
""" + _FORMULA


class FusedLinearDistillationLoss(nn.Module):
    __doc__ = """Module form of fused_linear_distillation_loss (see it for the arguments and the formula).

    FusedLinearDistillationLoss(temperature=2.0, alpha=0.5, kind="forward_kl", reduction="batchmean",
                                ignore_index=-100, scale_by_t2=True, chunk_size=None)
    forward(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, labels=None,
            *, student_bias=None, teacher_bias=None, teacher_logits=None)
"""

    def __init__(self, temperature=2.0, alpha=0.5, kind="forward_kl", reduction="batchmean",
                 ignore_index=-100, scale_by_t2=True, chunk_size=None):
        super().__init__()
        _check_config(temperature, alpha, kind, reduction, FUSED_REDUCTIONS)
        if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size > 0):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.temperature, self.alpha, self.kind = float(temperature), float(alpha), kind
        self.reduction, self.ignore_index, self.scale_by_t2 = reduction, int(ignore_index), bool(scale_by_t2)
        self.chunk_size = chunk_size

    def forward(self, student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, labels=None,
                *, student_bias=None, teacher_bias=None, teacher_logits=None):
        return fused_linear_distillation_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
            student_bias=student_bias, teacher_bias=teacher_bias, teacher_logits=teacher_logits,
            temperature=self.temperature, alpha=self.alpha, kind=self.kind, reduction=self.reduction,
            ignore_index=self.ignore_index, scale_by_t2=self.scale_by_t2, chunk_size=self.chunk_size)

    def extra_repr(self):
        return (f"temperature={self.temperature}, alpha={self.alpha}, kind={self.kind!r}, "
                f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"scale_by_t2={self.scale_by_t2}, chunk_size={self.chunk_size}")


__all__ = ["DistillationLoss", "FusedLinearDistillationLoss", "distillation_loss", "fused_linear_distillation_loss"]
