"""offload(): weight streaming gives the same outputs as the model left alone,
records and re-records the execution order, plans within the budget."""
import copy
import types
import warnings

import pytest
import torch
from torch import nn

import peft_ext
from peft_ext.nn import Int8Linear
from peft_ext import Offloader

from helpers import requires_cuda


class Net(nn.Module):
    """Layers of unequal size; `reverse` changes the execution order."""

    def __init__(self, d=48, widths=(64, 200, 96, 320, 56)):
        super().__init__()
        self.embed = nn.Embedding(30, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, w), nn.GELU(), nn.Linear(w, d)) for w in widths)
        self.head = nn.Linear(d, 11)
        self.reverse = False

    def forward(self, ids):
        x = self.embed(ids)
        for block in (reversed(self.blocks) if self.reverse else self.blocks):
            x = x + block(x)
        return self.head(x)


def nbytes(model):
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def pair(seed=0):
    torch.manual_seed(seed)
    ref = Net().requires_grad_(False).eval()
    return ref, copy.deepcopy(ref)


def ids(seed, shape=(3, 7)):
    return torch.randint(0, 30, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fraction", [0.0, 0.4, 2.0])
@pytest.mark.parametrize("prefetch", [1, 3])
def test_outputs_identical_on_cpu(fraction, prefetch):
    ref, model = pair()
    budget = int(nbytes(ref) * fraction)
    if fraction == 0.0:
        budget = max(p.numel() * 4 for p in ref.parameters()) * 3  # room for the ring only
    ctl = peft_ext.offload(model, device="cpu", max_resident_bytes=budget, prefetch=prefetch)
    assert ctl.plan.pending
    for step in range(4):
        x = ids(step, (1 + step, 5 + 2 * step))
        assert torch.equal(model(x), ref(x))
    plan = ctl.plan
    assert plan.resident_bytes + plan.ring_bytes <= budget
    assert len(plan.rows) == len(ctl.units)
    placements = {r.placement for r in plan.rows}
    if fraction >= 1:
        assert placements == {"resident"} and plan.depth == 0 and plan.streamed_bytes_per_forward == 0
    else:
        assert "streamed" in placements and 1 <= plan.depth <= prefetch
        assert ctl._ring is not None and ctl._ring.stats()["batches"] > 0
    text = str(plan)
    assert "placement" in text and "per forward" in text


def test_weights_stay_on_host_and_unchanged():
    ref, model = pair(1)
    ctl = peft_ext.offload(model, device="cpu", max_resident_bytes=0 + 4 * 320 * 48 * 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(3):
        model(ids(step))
    # Frozen weights are never written back: the host copies are the originals.
    for u in ctl.units:
        if not u.resident:
            for where, attr, host in u.entries:
                assert getattr(u.module, where)[attr] is host
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    ctl.remove()
    x = ids(9)
    assert torch.equal(model(x), ref(x))


def test_order_change_is_re_recorded():
    ref, model = pair(2)
    ctl = peft_ext.offload(model, device="cpu", max_resident_bytes=4 * 320 * 48 * 3, prefetch=2)
    model(ids(0))
    first = list(ctl.order)
    model(ids(1))
    for m in (ref, model):
        m.reverse = True
    for step in range(2, 6):
        x = ids(step)
        assert torch.equal(model(x), ref(x))
    assert ctl.order != first and ctl.plan is not None
    assert ctl._ring is not None  # streaming again under the new order


def test_int8_layers_stream_their_int8_buffers():
    torch.manual_seed(3)
    ref = Net().requires_grad_(False)
    peft_ext.patch(ref, exclude_modules=["head"], min_params=1)
    model = copy.deepcopy(ref)
    ctl = peft_ext.offload(model, device="cpu", max_resident_bytes=0 + 200 * 48 * 3)
    for step in range(3):
        x = ids(step)
        assert torch.equal(model(x), ref(x))
    int8_units = [u for u in ctl.units if isinstance(u.module, Int8Linear)]
    assert int8_units and all({a for _, a, _ in u.entries} >= {"weight", "weight_scale"} for u in int8_units)
    assert any(not u.resident for u in int8_units)


def test_trainable_parameters_stay_resident_and_train():
    ref, model = pair(4)
    for m in (ref, model):
        m.head.requires_grad_(True)
    ctl = peft_ext.offload(model, device="cpu", max_resident_bytes=4 * 320 * 48 * 2)
    assert all(u.module is not model.head or {a for _, a, _ in u.entries} == set() for u in ctl.units)
    for step in range(3):
        x = ids(step)
        for m in (ref, model):
            m.zero_grad()
            m(x).square().mean().backward()
        torch.testing.assert_close(model.head.weight.grad, ref.head.weight.grad, rtol=0, atol=0)
    assert model.blocks[0][1].weight.grad is None


def test_patch_offload_keyword():
    ref, model = pair(5)
    peft_ext.patch(ref, min_params=1)
    report = peft_ext.patch(model, min_params=1, offload={"device": "cpu", "max_resident_bytes": 20_000})
    assert isinstance(report.offload, Offloader)
    for step in range(3):
        x = ids(step)
        assert torch.equal(model(x), ref(x))


def test_bad_arguments():
    ref, model = pair()
    with pytest.raises(ValueError, match="prefetch"):
        peft_ext.offload(model, device="cpu", max_resident_bytes=10, prefetch=0)
    with pytest.raises(ValueError, match="max_resident_bytes"):
        peft_ext.offload(model, device="cpu", max_resident_bytes=-1)
    with pytest.raises(ValueError, match="max_resident_bytes"):
        peft_ext.offload(model, device="cpu", max_resident_bytes=2.5)
    with pytest.raises(ValueError, match="freeze"):
        peft_ext.offload(model, device="cpu", freeze=1)


def test_budget_below_the_largest_layer_raises_in_offload():
    ref, model = pair()
    before = {k: (v.data_ptr(), v.device) for k, v in model.state_dict().items()}
    largest = 320 * 48 * 4 + 320 * 4  # blocks.3.1: Linear(48, 320)
    with pytest.raises(ValueError, match=rf"max_resident_bytes=100 cannot hold the largest module, "
                                         rf"blocks.3.1 \({largest} bytes.*>= {largest}"):
        peft_ext.offload(model, device="cpu", max_resident_bytes=100)
    # Nothing moved, no hooks: the model is as it was.
    assert {k: (v.data_ptr(), v.device) for k, v in model.state_dict().items()} == before
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    ctl = peft_ext.offload(model, device="cpu", max_resident_bytes=largest)
    for step in range(3):
        x = ids(step)
        assert torch.equal(model(x), ref(x))
    assert ctl.plan.depth == 1


def test_cpu_default_budget_keeps_everything_resident():
    ref, model = pair()
    ctl = peft_ext.offload(model, device="cpu")
    x = ids(0)
    assert torch.equal(model(x), ref(x)) and torch.equal(model(x), ref(x))
    assert {r.placement for r in ctl.plan.rows} == {"resident"}


def test_default_device_is_the_accelerator_else_cpu():
    ref, model = pair()
    ctl = peft_ext.offload(model)
    acc = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    assert ctl.device.type == (acc.type if acc is not None and acc.type == "cuda" else "cpu")
    ctl.remove()


def test_plan_before_the_first_forward_says_when_it_is_made():
    ref, model = pair()
    ctl = peft_ext.offload(model, device="cpu", max_resident_bytes=4 * 320 * 48 * 2)
    text = str(ctl.plan)
    assert ctl.plan.pending and "plan made at the first forward" in text
    assert "blocks.3.1" in text and "embed" in text
    model(ids(0))
    assert not ctl.plan.pending and "per forward" in str(ctl.plan)


def test_all_trainable_model_warns_or_freezes():
    torch.manual_seed(0)
    ref, model = Net().eval(), None
    model = copy.deepcopy(ref)
    with pytest.warns(UserWarning, match="trainable.*freeze=True"):
        ctl = peft_ext.offload(model, device="cpu", max_resident_bytes=10_000)
    assert not ctl.units  # nothing frozen: nothing streams
    ctl.remove()
    model = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ctl = peft_ext.offload(model, device="cpu", max_resident_bytes=4 * 320 * 48 * 2, freeze=True)
    assert not any(p.requires_grad for p in model.parameters())
    for step in range(3):
        x = ids(step)
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    assert "streamed" in {r.placement for r in ctl.plan.rows}


class BNNet(nn.Module):
    """BatchNorm's running statistics and a custom buffer written in place."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(12, 40), nn.BatchNorm1d(40), nn.Linear(40, 40)
        self.count = Counter()
        self.out = nn.Linear(40, 5)

    def forward(self, x):
        return self.out(self.count(self.fc2(self.bn(self.fc1(x)).relu())))


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("scale", torch.ones(40))

    def forward(self, x):
        self.calls += 1  # in place: its version counter moves
        return x * self.scale


def test_buffers_a_forward_writes_are_kept():
    torch.manual_seed(7)
    ref = BNNet().requires_grad_(False).train()
    model = copy.deepcopy(ref)
    ctl = peft_ext.offload(model, device="cpu", max_resident_bytes=40 * 40 * 4 + 160 + 64)
    g = torch.Generator().manual_seed(0)
    for step in range(6):
        x = torch.randn(9, 12, generator=g) + step
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    assert model.bn.num_batches_tracked.item() == 6 and model.count.calls.item() == 6
    torch.testing.assert_close(model.bn.running_mean, ref.bn.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(model.bn.running_var, ref.bn.running_var, rtol=0, atol=0)
    assert any("bn.running_mean" in k for k in ctl.plan.kept_on_device)
    assert any("count.calls" in k for k in ctl.plan.kept_on_device)
    for m in (ref, model):
        m.eval()
    for step in range(3):
        x = torch.randn(4, 12, generator=g)
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    assert "streamed" in {r.placement for r in ctl.plan.rows}


def test_activation_checkpointing_keeps_the_order_and_streams():
    ref, model = pair(8)
    for m in (ref, model):
        m.embed.requires_grad_(True)

    def checkpointed(self, ids_):
        x = self.embed(ids_)
        for block in self.blocks:
            x = x + torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return self.head(x)

    for m in (ref, model):
        m.forward = types.MethodType(checkpointed, m)
    ctl = peft_ext.offload(model, device="cpu", max_resident_bytes=4 * 320 * 48 * 2)
    lengths = []
    for step in range(5):
        x = ids(step)
        for m in (ref, model):
            m.zero_grad()
            m(x).square().mean().backward()
        torch.testing.assert_close(model.embed.weight.grad, ref.embed.weight.grad, rtol=0, atol=0)
        lengths.append(len(ctl.order))
    assert len(set(lengths)) == 1
    assert ctl._ring is not None and ctl._ring.stats()["batches"] > 0


def test_deepcopy_of_an_offloaded_model_raises_clearly():
    ref, model = pair()
    ctl = peft_ext.offload(model, device="cpu", max_resident_bytes=4 * 320 * 48 * 2)
    model(ids(0))
    model(ids(1))
    with pytest.raises(TypeError, match="remove"):
        copy.deepcopy(model)
    ctl.remove()
    twin = copy.deepcopy(model)
    x = ids(2)
    assert torch.equal(twin(x), ref(x))


def test_unpatch_after_patch_offload_leaves_no_hooks():
    ref, model = pair(5)
    peft_ext.patch(ref, min_params=1)
    report = peft_ext.patch(model, min_params=1, offload={"device": "cpu", "max_resident_bytes": 20_000})
    for step in range(2):
        x = ids(step)
        assert torch.equal(model(x), ref(x))
    peft_ext.unpatch(model)
    peft_ext.unpatch(ref)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert report.offload._ring is None
    for step in range(2):
        x = ids(step)
        assert torch.equal(model(x), ref(x))


INT8_ON_CUDA = torch._C._dispatch_has_kernel_for_dispatch_key("peft_ext::int8_linear", "CUDA")


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("int8", [False, True])
def test_cuda_streaming_matches_resident_model(int8):
    if int8 and not INT8_ON_CUDA:
        pytest.skip("the int8 ops have no CUDA kernels in this build")
    ref, model = pair(6)
    if int8:
        peft_ext.patch(ref, min_params=1)
        model = copy.deepcopy(ref)
    ref = ref.cuda()
    budget = nbytes(ref) // 3
    ctl = peft_ext.offload(model, device="cuda", max_resident_bytes=budget)
    for step in range(5):
        x = ids(step).cuda()
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    assert "streamed" in {r.placement for r in ctl.plan.rows}
    assert ctl.plan.resident_bytes + ctl.plan.ring_bytes <= budget
