"""The sparse ops' autograd keeps the activation x only when the stored values
learn: fine-tuning through frozen sparse layers keeps no activations."""
import pytest
import torch

from peft_ext.ops import sparse as sparse_ops
from helpers import make_24, make_bsr, make_csr

CASES = {
    "2:4": (lambda g: make_24(6, 36, 5, g), sparse_ops.sparse24_linear, 1),
    "csr": (lambda g: make_csr(6, 30, 7, g), sparse_ops.csr_linear, 3),
    "bsr": (lambda g: make_bsr(6, (4, 8), 2, 3, g), sparse_ops.bsr_linear, 3),
}


def saved_during(fn, *args):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, saved


def holds(saved, t):
    return any(s.data_ptr() == t.data_ptr() and s.shape == t.shape for s in saved)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_frozen_values_save_no_activation(kind):
    make, fn, values_at = CASES[kind]
    args = list(make(torch.Generator().manual_seed(7)))
    x = args[0].requires_grad_(True)
    args[-1].requires_grad_(True)  # the bias learns; the values stay frozen
    out, saved = saved_during(fn, *args)
    assert not holds(saved, x)
    grad = torch.randn_like(out)
    out.backward(grad)  # the backward still works without x
    assert x.grad is not None and args[-1].grad is not None


@pytest.mark.parametrize("kind", sorted(CASES))
def test_trainable_values_save_the_activation(kind):
    make, fn, values_at = CASES[kind]
    args = list(make(torch.Generator().manual_seed(8)))
    x = args[0].requires_grad_(True)
    args[values_at].requires_grad_(True)
    out, saved = saved_during(fn, *args)
    assert holds(saved, x)
    out.sum().backward()
    assert args[values_at].grad is not None and args[values_at].grad.shape == args[values_at].shape
