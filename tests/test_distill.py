"""DistillationLoss and its fused-linear variant against a plain PyTorch formulation."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from peft_ext.distill import (DistillationLoss, FusedLinearDistillationLoss, distillation_loss,
                              fused_linear_distillation_loss)

KINDS = ["forward_kl", "reverse_kl", "jsd"]
IGNORE = -100


def gen(seed=None):
    return torch.Generator().manual_seed(torch.seed() % 2**31 if seed is None else seed)


def plain_loss(student, teacher, labels, temperature, alpha, kind, ignore_index=IGNORE, scale_by_t2=True):
    """The textbook formulation, written with F.kl_div and F.cross_entropy, in float64."""
    v = student.shape[-1]
    s = student.double().reshape(-1, v)
    t = teacher.double().reshape(-1, v)
    lab = labels.reshape(-1) if labels is not None else torch.zeros(s.shape[0], dtype=torch.long)
    keep = lab != ignore_index if labels is not None else torch.ones_like(lab, dtype=torch.bool)
    s, t, lab = s[keep], t[keep], lab[keep]
    n = max(int(keep.sum()), 1)
    log_p = F.log_softmax(s / temperature, -1)
    log_q = F.log_softmax(t / temperature, -1)
    if kind == "forward_kl":    # KL(q || p): kl_div(input=log p, target=q)
        kd = F.kl_div(log_p, log_q, reduction="sum", log_target=True)
    elif kind == "reverse_kl":  # KL(p || q)
        kd = F.kl_div(log_q, log_p, reduction="sum", log_target=True)
    else:
        log_m = torch.log(0.5 * (log_p.exp() + log_q.exp()))
        kd = 0.5 * F.kl_div(log_m, log_q, reduction="sum", log_target=True) \
            + 0.5 * F.kl_div(log_m, log_p, reduction="sum", log_target=True)
    c = temperature ** 2 if scale_by_t2 else 1.0
    ce = F.cross_entropy(s, lab, reduction="sum") if alpha < 1 else 0.0
    return (alpha * c * kd + (1 - alpha) * ce) / n


def make_logits(shape, vocab, g, dtype=torch.float32, ignore_frac=0.3):
    s = (torch.randn(*shape, vocab, generator=g) * 3).to(dtype)
    t = (torch.randn(*shape, vocab, generator=g) * 3).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_frac] = IGNORE
    labels.view(-1)[0] = 1  # at least one counted token
    return s, t, labels


def make_hidden(lead, h_s, h_t, vocab, g, dtype=torch.float32, bias=True):
    x = {
        "student_hidden": torch.randn(*lead, h_s, generator=g),
        "student_weight": torch.randn(vocab, h_s, generator=g) / math.sqrt(h_s),
        "student_bias": torch.randn(vocab, generator=g) if bias else None,
        "teacher_hidden": torch.randn(*lead, h_t, generator=g),
        "teacher_weight": torch.randn(vocab, h_t, generator=g) / math.sqrt(h_t),
        "teacher_bias": torch.randn(vocab, generator=g) if bias else None,
    }
    x = {k: (v.to(dtype).requires_grad_(k.startswith("student")) if v is not None else None) for k, v in x.items()}
    labels = torch.randint(0, vocab, lead, generator=g)
    labels[torch.rand(lead, generator=g) < 0.3] = IGNORE
    labels.view(-1)[0] = 2
    return x, labels


def unfused(x, labels, **cfg):
    """The fused loss's meaning: materialize the logits, then DistillationLoss."""
    s = F.linear(x["student_hidden"], x["student_weight"], x["student_bias"])
    t = F.linear(x["teacher_hidden"], x["teacher_weight"], x["teacher_bias"])
    cfg.pop("chunk_size", None)
    return distillation_loss(s, t, labels, **cfg)


def fused(x, labels, **cfg):
    return fused_linear_distillation_loss(
        x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"], labels,
        student_bias=x["student_bias"], teacher_bias=x["teacher_bias"], **cfg)


def student_grads(loss, x):
    params = [v for k, v in x.items() if k.startswith("student") and v is not None]
    return torch.autograd.grad(loss, params)


# --- DistillationLoss on logits --------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(7,), (3, 11)])
@pytest.mark.parametrize("temperature,alpha", [(2.0, 0.5), (0.7, 0.3), (4.0, 0.9)])
def test_matches_plain_pytorch(kind, shape, temperature, alpha):
    g = gen()
    s, t, labels = make_logits(shape, 29, g)
    s.requires_grad_(True)
    loss = DistillationLoss(temperature, alpha, kind)(s, t, labels)
    ref = plain_loss(s, t, labels, temperature, alpha, kind)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    (gs,) = torch.autograd.grad(loss, s)
    s64 = s.detach().double().requires_grad_(True)
    (gref,) = torch.autograd.grad(plain_loss(s64, t, labels, temperature, alpha, kind), s64)
    torch.testing.assert_close(gs.double(), gref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_logits(kind):
    g = gen()
    s, t, labels = make_logits((2, 5), 7, g)
    s = s.double().requires_grad_(True)
    for alpha in (0.0, 0.4, 1.0):
        fn = lambda s: distillation_loss(s, t.double(), labels, temperature=1.5, alpha=alpha, kind=kind)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (s,), fast_mode=True)


def test_scale_by_t2_and_reductions():
    g = gen()
    s, t, labels = make_logits((4, 6), 13, g)
    a = distillation_loss(s, t, labels, temperature=3.0, alpha=1.0)
    b = distillation_loss(s, t, labels, temperature=3.0, alpha=1.0, scale_by_t2=False)
    torch.testing.assert_close(a, 9.0 * b)
    per = distillation_loss(s, t, labels, alpha=0.5, reduction="none")
    assert per.shape == (4, 6)
    assert torch.all(per[labels == IGNORE] == 0)
    total = distillation_loss(s, t, labels, alpha=0.5, reduction="sum")
    mean = distillation_loss(s, t, labels, alpha=0.5)
    torch.testing.assert_close(per.sum(), total)
    torch.testing.assert_close(total / (labels != IGNORE).sum(), mean)


def test_alpha_edges():
    g = gen()
    s, t, labels = make_logits((3, 8), 17, g)
    # alpha = 0: plain cross entropy, the teacher does not matter
    ce = distillation_loss(s, t, labels, alpha=0.0)
    torch.testing.assert_close(ce, F.cross_entropy(s.reshape(-1, 17), labels.reshape(-1), ignore_index=IGNORE))
    torch.testing.assert_close(distillation_loss(s, torch.randn_like(t), labels, alpha=0.0), ce)
    # alpha = 1: pure KD; labels optional (then every token counts), and their values do not matter
    kd_all = distillation_loss(s, t, None, alpha=1.0, kind="jsd")
    torch.testing.assert_close(kd_all.double(), plain_loss(s, t, None, 2.0, 1.0, "jsd"))
    other = torch.where(labels == IGNORE, labels, (labels + 5) % 17)
    torch.testing.assert_close(distillation_loss(s, t, labels, alpha=1.0), distillation_loss(s, t, other, alpha=1.0))


def test_ignored_tokens_change_nothing():
    g = gen()
    s, t, labels = make_logits((3, 9), 11, g, ignore_frac=0.5)
    ign = labels == IGNORE
    for kind in KINDS:
        s1 = s.clone().requires_grad_(True)
        loss1 = distillation_loss(s1, t, labels, kind=kind)
        (g1,) = torch.autograd.grad(loss1, s1)
        s2 = s.clone()
        t2 = t.clone()
        s2[ign] = torch.randn(int(ign.sum()), 11) * 50
        t2[ign] = float("nan")
        s2.requires_grad_(True)
        loss2 = distillation_loss(s2, t2, labels, kind=kind)
        (g2,) = torch.autograd.grad(loss2, s2)
        torch.testing.assert_close(loss1, loss2, rtol=0, atol=0)
        torch.testing.assert_close(g1, g2, rtol=0, atol=0)
        assert torch.all(g2[ign] == 0)


def test_all_ignored_is_zero_and_nan_propagates():
    g = gen()
    s, t, labels = make_logits((2, 4), 5, g)
    assert distillation_loss(s, t, torch.full_like(labels, IGNORE)).item() == 0.0
    s[0, 0, 0] = float("nan")
    labels[0, 0] = 3
    assert torch.isnan(distillation_loss(s, t, labels))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_give_float32_loss(dtype):
    g = gen()
    s, t, labels = make_logits((2, 7), 31, g, dtype=dtype)
    s.requires_grad_(True)
    loss = distillation_loss(s, t, labels, kind="jsd")
    assert loss.dtype == torch.float32
    # computed in float32 from the rounded inputs: as precise as the float64 formulation
    torch.testing.assert_close(loss.double(), plain_loss(s, t, labels, 2.0, 0.5, "jsd"), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert s.grad.dtype == dtype


def test_teacher_gets_no_gradient():
    g = gen()
    s, t, labels = make_logits((6,), 9, g)
    s.requires_grad_(True)
    t.requires_grad_(True)
    distillation_loss(s, t, labels).backward()
    assert t.grad is None and s.grad is not None


def test_bad_inputs():
    g = gen()
    s, t, labels = make_logits((2, 3), 5, g)
    fn = DistillationLoss()
    with pytest.raises(ValueError, match="teacher_logits"):
        fn(s, t[:, :2], labels)
    with pytest.raises(ValueError, match="labels"):
        fn(s, t, labels[:, :2])
    with pytest.raises(TypeError, match="labels"):
        fn(s, t, labels.float())
    with pytest.raises(TypeError, match="student_logits"):
        fn(s.long(), t, labels)
    with pytest.raises(TypeError, match="teacher_logits"):
        fn(s, t.to(torch.int32), labels)
    with pytest.raises(ValueError, match="student_logits"):
        fn(s[0, 0], t[0, 0], labels[0, 0])
    with pytest.raises(ValueError, match="labels are required"):
        fn(s, t)
    with pytest.raises(ValueError, match="alpha"):
        DistillationLoss(alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        DistillationLoss(temperature=0.0)
    with pytest.raises(ValueError, match="kind"):
        DistillationLoss(kind="kl")
    with pytest.raises(ValueError, match="reduction"):
        DistillationLoss(reduction="mean")


# --- the fused-linear variant ----------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lead,chunk", [((2, 13), 5), ((17,), 1), ((3, 7), 64), ((4, 9), None)])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_matches_unfused(kind, lead, chunk, bias):
    g = gen()
    x, labels = make_hidden(lead, 10, 6, 37, g, bias=bias)
    cfg = dict(temperature=1.7, alpha=0.6, kind=kind, chunk_size=chunk)
    ref = unfused(x, labels, **cfg)
    out = fused(x, labels, **cfg)
    assert out.dtype == torch.float32 and out.shape == ()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(student_grads(out * 1.3, x), student_grads(ref * 1.3, x)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_fused_alpha_edges_and_sum(kind, alpha):
    g = gen()
    x, labels = make_hidden((3, 5), 8, 8, 19, g)
    cfg = dict(temperature=2.5, alpha=alpha, kind=kind, reduction="sum", chunk_size=4)
    ref = unfused(x, labels, **cfg)
    out = fused(x, labels, **cfg)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(student_grads(out, x), student_grads(ref, x)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    if alpha == 1.0:  # labels optional
        torch.testing.assert_close(fused(x, None, **cfg), unfused(x, None, **cfg), rtol=1e-5, atol=1e-5)


def test_fused_teacher_logits_and_no_teacher_gradient():
    g = gen()
    x, labels = make_hidden((2, 11), 12, 9, 23, g)
    for k in ("teacher_hidden", "teacher_weight", "teacher_bias"):
        x[k].requires_grad_(True)
    t_logits = F.linear(x["teacher_hidden"], x["teacher_weight"], x["teacher_bias"])
    by_logits = fused_linear_distillation_loss(x["student_hidden"], x["student_weight"], labels=labels,
                                               student_bias=x["student_bias"], teacher_logits=t_logits,
                                               kind="reverse_kl", chunk_size=3)
    by_hidden = fused(x, labels, kind="reverse_kl", chunk_size=3)
    torch.testing.assert_close(by_logits, by_hidden)
    (by_logits + by_hidden).backward()
    assert all(x[k].grad is None for k in ("teacher_hidden", "teacher_weight", "teacher_bias"))
    assert x["student_weight"].grad is not None


@pytest.mark.parametrize("kind", KINDS)
def test_fused_gradcheck(kind):
    g = gen()
    x, labels = make_hidden((2, 5), 4, 3, 7, g, dtype=torch.float64)
    fn = lambda h, w, b: fused_linear_distillation_loss(  # noqa: E731
        h, w, x["teacher_hidden"], x["teacher_weight"], labels, student_bias=b,
        teacher_bias=x["teacher_bias"], temperature=1.3, alpha=0.4, kind=kind, chunk_size=3)
    out = fn(x["student_hidden"], x["student_weight"], x["student_bias"])
    assert out.dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (x["student_hidden"], x["student_weight"], x["student_bias"]), fast_mode=True)


def test_fused_bf16():
    g = gen()
    x, labels = make_hidden((3, 10), 16, 8, 64, g, dtype=torch.bfloat16)
    out = fused(x, labels, kind="jsd", chunk_size=7)
    ref = unfused(x, labels, kind="jsd")
    assert out.dtype == torch.float32 and ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    grads = student_grads(out, x)
    assert all(gr.dtype == torch.bfloat16 for gr in grads)
    for a, b in zip(grads, student_grads(ref, x)):
        torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-3)


def test_fused_ignored_tokens_change_nothing():
    g = gen()
    x, labels = make_hidden((4, 6), 8, 5, 21, g)
    ign = labels == IGNORE
    out1 = fused(x, labels, kind="forward_kl", chunk_size=5)
    g1 = student_grads(out1, x)
    x2 = dict(x)
    h = x["student_hidden"].detach().clone()
    h[ign] = torch.randn(int(ign.sum()), 8) * 100
    x2["student_hidden"] = h.requires_grad_(True)
    th = x["teacher_hidden"].clone()
    th[ign] = float("nan")
    x2["teacher_hidden"] = th
    out2 = fused(x2, labels, kind="forward_kl", chunk_size=5)
    g2 = student_grads(out2, x2)
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)
    torch.testing.assert_close(g1[1:], g2[1:], rtol=1e-6, atol=1e-7)  # weight, bias
    torch.testing.assert_close(g1[0][~ign], g2[0][~ign], rtol=0, atol=0)
    assert torch.all(g2[0][ign] == 0)


def test_fused_no_grad_gives_the_loss():
    g = gen()
    x, labels = make_hidden((9,), 6, 6, 15, g)
    with torch.no_grad():
        out = fused(x, labels, chunk_size=2)
    assert not out.requires_grad
    torch.testing.assert_close(out, unfused(x, labels).detach())


def test_fused_bad_inputs():
    g = gen()
    x, labels = make_hidden((2, 3), 4, 5, 6, g)
    h, w, th, tw = x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"]
    f = fused_linear_distillation_loss
    with pytest.raises(ValueError, match="student_weight"):
        f(h, w[:, :3], th, tw, labels)
    with pytest.raises(TypeError, match="student_weight"):
        f(h, w.double(), th, tw, labels)
    with pytest.raises(ValueError, match="teacher_weight"):
        f(h, w, th, tw[:5], labels)
    with pytest.raises(ValueError, match="teacher_hidden"):
        f(h, w, th[:1], tw, labels)
    with pytest.raises(ValueError, match="together"):
        f(h, w, th, None, labels)
    with pytest.raises(ValueError, match="not both"):
        f(h, w, th, tw, labels, teacher_logits=torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="teacher_logits"):
        f(h, w, labels=labels, teacher_logits=torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match="teacher is missing"):
        f(h, w, labels=labels)
    with pytest.raises(ValueError, match="student_bias"):
        f(h, w, th, tw, labels, student_bias=torch.randn(5))
    with pytest.raises(ValueError, match="labels"):
        f(h, w, th, tw, labels[:, :1])
    with pytest.raises(ValueError, match="chunk_size"):
        f(h, w, th, tw, labels, chunk_size=0)
    with pytest.raises(ValueError, match="reduction"):
        FusedLinearDistillationLoss(reduction="none")


# --- memory: the fused variant never allocates a (tokens x vocab) tensor ----------------------

class LargestOutput(TorchDispatchMode):
    """Records the largest tensor any aten op produces (forward and backward alike)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_fused_peak_is_bounded_by_the_chunk():
    tokens, hidden, vocab, chunk = 512, 8, 256, 16
    x, labels = make_hidden((tokens,), hidden, hidden, vocab, gen())
    with LargestOutput() as rec:
        student_grads(fused(x, labels, kind="jsd", chunk_size=chunk), x)
    # the largest tensors: a (chunk x vocab) block, the (vocab x hidden) weight grad, the (tokens x hidden) grad
    assert rec.largest <= max(chunk * vocab, vocab * hidden, tokens * hidden)
    with LargestOutput() as rec_unfused:  # the recorder does see full logits when they exist
        student_grads(unfused(x, labels, kind="jsd"), x)
    assert rec_unfused.largest >= tokens * vocab


def test_module_forms():
    g = gen()
    x, labels = make_hidden((2, 4), 6, 6, 9, g)
    m = FusedLinearDistillationLoss(temperature=3.0, alpha=0.2, kind="jsd", chunk_size=3)
    assert "jsd" in repr(m)
    out = m(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"], labels,
            student_bias=x["student_bias"], teacher_bias=x["teacher_bias"])
    torch.testing.assert_close(out, unfused(x, labels, temperature=3.0, alpha=0.2, kind="jsd"))
