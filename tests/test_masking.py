"""Masked fine-tuning handles: they follow the weight's dtype and device,
survive copy.deepcopy, die with their model, and remove_masks() reaches the
layers patch(prune=...) keeps dense."""
import copy
import gc

import pytest
import torch
from torch import nn

import peft_ext
from peft_ext import masking

from helpers import requires_cuda


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))


def linears(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def train(model, steps=5, dtype=torch.float32, device="cpu", lr=0.05):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 64, generator=g).to(device, dtype)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=0.01)
    for _ in range(steps):
        loss = model(x).float().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def zeros_kept(model, zeros):
    return all((m.weight[z] == 0).all() for m, z in zip(linears(model), zeros))


def zeros_of(model):
    return [m.weight.detach() == 0 for m in linears(model)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_masks_follow_the_weight_dtype(dtype):
    model = mlp()
    peft_ext.prune(model, 0.5, "2:4", exclude_modules=None)
    model.to(dtype)
    zeros = zeros_of(model)
    train(model, dtype=dtype)
    assert zeros_kept(model, zeros)
    assert all(m.weight.dtype == dtype for m in linears(model))
    assert any((m.weight[~z] != 0).any() for m, z in zip(linears(model), zeros))


@pytest.mark.cuda
@requires_cuda
def test_masks_follow_the_weight_device():
    model = mlp()
    peft_ext.prune(model, 0.5, "2:4", exclude_modules=None)
    model.cuda()
    zeros = zeros_of(model)
    train(model, device="cuda")
    assert zeros_kept(model, zeros)


def test_deepcopy_keeps_its_own_masks():
    model = mlp()
    peft_ext.prune(model, 0.5, "unstructured", exclude_modules=None)
    twin = copy.deepcopy(model)
    zeros = zeros_of(twin)
    train(twin)
    assert zeros_kept(twin, zeros)
    # The copy's handles hold the copy's weights, and the original keeps its own.
    assert {id(h.param()) for h in masking.live_handles()} >= {id(m.weight) for m in linears(twin) + linears(model)}
    train(model)
    assert zeros_kept(model, zeros)


def test_pickled_model_keeps_its_masks(tmp_path):
    model = mlp()
    peft_ext.prune(model, 0.5, "2:4", exclude_modules=None)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    zeros = zeros_of(loaded)
    train(loaded)
    assert zeros_kept(loaded, zeros)


def test_deleted_models_free_their_masks():
    gc.collect()
    before = len(masking.live_handles())
    reports = []
    for seed in range(30):
        model = mlp(seed)
        reports.append(peft_ext.prune(model, 0.5, "2:4", exclude_modules=None))
        del model
    gc.collect()
    assert len(masking.live_handles()) == before
    # The reports (kept) do not keep handles alive either, and their
    # remove_masks() is a no-op on a model that is gone.
    reports[0].remove_masks()


def test_remove_masks_reaches_layers_patch_keeps_dense():
    model = mlp()
    report = peft_ext.patch(model, prune=dict(sparsity=0.5, pattern="unstructured"), exclude_modules=None,
                            min_params=1)
    dense = [m for m in linears(model)]
    assert dense and all(type(m) is nn.Linear for m in dense)  # 50% unstructured stays dense
    assert any(masking.handles_of(m) for m in dense)
    zeros = zeros_of(model)
    train(model)
    assert zeros_kept(model, zeros)
    twin = copy.deepcopy(model)  # the copy keeps its zeros too
    train(twin)
    assert zeros_kept(twin, zeros)
    report.pruned.remove_masks()
    assert not any(masking.handles_of(m) for m in dense)
    train(model)
    assert any((m.weight[z] != 0).any() for m, z in zip(dense, zeros))


def test_remove_masks_then_training_moves_zeros():
    model = mlp()
    report = peft_ext.prune(model, 0.5, "2:4", exclude_modules=None)
    zeros = zeros_of(model)
    report.remove_masks()
    train(model)
    assert any((m.weight[z] != 0).any() for m, z in zip(linears(model), zeros))
