"""SparseLinear (from_linear, to_linear, state dict, torch.load, gradients)
and patch()/unpatch() with sparsity."""
import io

import pytest
import torch
from torch import nn

import peft_ext
from peft_ext.nn import SparseLinear
from helpers import requires_cuda
from helpers import toy

CASES = [("2:4", {}), ("unstructured", {}), ("block", {"block": (16, 16)}), ("block", {"block": (4, 8)})]


def pruned_linear(pattern, kw, k=64, n=48, bias=True):
    lin = nn.Linear(k, n, bias=bias)
    sparsity = 0.5 if pattern == "2:4" else 0.75
    peft_ext.prune(nn.Sequential(lin), sparsity, pattern, exclude_modules=None, masked_training=False, **kw)
    return lin


@pytest.mark.parametrize("pattern, kw", CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_matches_the_pruned_linear(isa, pattern, kw, bias):
    lin = pruned_linear(pattern, kw, bias=bias)
    sp = SparseLinear.from_linear(lin, pattern=pattern, **kw)
    assert not isinstance(sp, nn.Linear)
    for shape in [(1, 64), (3, 5, 64), (17, 64)]:
        x = torch.randn(shape)
        torch.testing.assert_close(sp(x), lin(x), atol=1e-5, rtol=1e-5)
    back = sp.to_linear()
    assert type(back) is nn.Linear
    torch.testing.assert_close(back.weight, lin.weight, atol=0, rtol=0)
    if pattern != "block":
        assert sp.nnz == int((lin.weight != 0).sum()) or pattern == "2:4"
    assert sp.sparsity >= (0.5 if pattern == "2:4" else 0.74)


@pytest.mark.parametrize("pattern, kw", CASES)
def test_state_dict_and_weights_only_load_round_trip(pattern, kw):
    lin = pruned_linear(pattern, kw)
    sp = SparseLinear.from_linear(lin, pattern=pattern, **kw)
    buf = io.BytesIO()
    torch.save(sp.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = SparseLinear(64, 48, pattern=pattern, **kw)  # nnz unknown: buffers resize on load
    fresh.load_state_dict(state)
    x = torch.randn(4, 64)
    torch.testing.assert_close(fresh(x), sp(x), atol=0, rtol=0)


def test_gradient_reaches_input_and_trainable_values():
    lin = pruned_linear("2:4", {})
    sp = SparseLinear.from_linear(lin, pattern="2:4", train_values=True)
    assert isinstance(sp.values, nn.Parameter)
    x = torch.randn(6, 64, requires_grad=True)
    xd = x.detach().clone().requires_grad_(True)
    sp(x).square().sum().backward()
    lin(xd).square().sum().backward()
    torch.testing.assert_close(x.grad, xd.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sp.dense_weight().ne(0), lin.weight.ne(0))
    opt = torch.optim.SGD(sp.parameters(), lr=0.1)
    opt.step()
    dense = sp.dense_weight()
    assert (dense[lin.weight == 0] == 0).all()  # zeros stay zeros by construction
    assert not torch.equal(dense, lin.weight.detach())


def test_from_linear_rejects_what_the_pattern_cannot_hold():
    with pytest.raises(ValueError, match="keeps more than two of four"):
        SparseLinear.from_linear(nn.Linear(8, 4), pattern="2:4")
    with pytest.raises(ValueError, match="multiple of 4"):
        SparseLinear.from_linear(nn.Linear(6, 4), pattern="2:4", mask=torch.zeros(4, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not tile"):
        SparseLinear.from_linear(nn.Linear(20, 16), pattern="block")
    with pytest.raises(ValueError, match="pattern must be"):
        SparseLinear.from_linear(nn.Linear(8, 4), pattern="3:4")


@pytest.mark.parametrize("kwargs, kind", [
    (dict(sparsity=0.5), "SparseLinear[2:4]"),
    (dict(sparsity=0.75, pattern="block"), "SparseLinear[block]"),
    (dict(sparsity=0.9, pattern="unstructured"), "SparseLinear[unstructured]"),
    (dict(sparsity=0.5, pattern="unstructured"), "Linear[pruned]"),
    (dict(sparsity=0.5, quantize="int8"), "Int8Linear[dynamic]"),
])
def test_patch_with_sparsity_prunes_swaps_and_unpatches(kwargs, kind):
    model = toy()
    x = torch.randn(2, 7, 64)
    report = peft_ext.patch(model, **kwargs)
    assert len(report) == 8 and all(r.new_type == kind for r in report.replaced)
    assert all(abs(r.sparsity - kwargs["sparsity"]) < 0.01 for r in report.replaced)
    text = str(report)
    assert "sparsity" in text and "kernel" in text
    if kind == "Linear[pruned]":
        assert "dense at::matmul (CSR kernel slower below 90% sparsity)" in text
    if kind.startswith("Int8"):
        assert report.bytes_after < report.bytes_before / 3
    elif kind.startswith("Sparse"):
        assert report.bytes_after < report.bytes_before
    y = model(x)
    peft_ext.unpatch(model)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.startswith("layers.") and "proj" in n)
    torch.testing.assert_close(model(x), y, atol=0.05 if kind.startswith("Int8") else 1e-5, rtol=1e-3)


def test_patch_without_sparsity_is_unchanged_and_bad_sparsity_leaves_model_alone():
    model = toy()
    report = peft_ext.patch(model)
    assert all(r.new_type == "Int8Linear[dynamic]" and r.sparsity is None for r in report.replaced)
    assert "kernel" not in str(report)
    model = toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="sparsity must be in"):
        peft_ext.patch(model, sparsity=1.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sparse_model_fine_tunes_through_the_input_gradient():
    model = toy()
    peft_ext.patch(model, sparsity=0.5, exclude_modules=["layers.0.q_proj", "lm_head"])
    assert isinstance(model.layers[1].q_proj, SparseLinear)
    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(16, 64, generator=g), torch.randint(0, 50, (16,), generator=g)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert model.layers[0].q_proj.weight.grad is not None  # reached through the sparse layers above


def test_torch_compile_fullgraph_traces_the_sparse_ops():
    model = nn.Sequential(SparseLinear.from_linear(pruned_linear("2:4", {}), pattern="2:4"), nn.ReLU(),
                          SparseLinear.from_linear(pruned_linear("block", {"block": (16, 16)}, k=48, n=32),
                                                   pattern="block"))
    x = torch.randn(5, 64)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x))


def test_patch_rejects_a_pattern_without_kernel_before_pruning():
    model = toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no sparse kernel"):
        peft_ext.patch(model, sparsity=0.75, pattern="1:4")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    report = peft_ext.patch(model, sparsity=0.75, pattern="1:4", quantize="int8_weight_only")
    assert all(r.new_type == "Int8Linear[weight_only]" for r in report.replaced)


def test_choose_kernel_is_honest_about_where_sparse_loses():
    from peft_ext.nn.sparse_linear import choose_kernel

    assert choose_kernel("2:4", 0.5) == (True, "2:4 kernel")
    assert choose_kernel("block", 0.9) == (True, "BSR kernel")
    assert choose_kernel("unstructured", 0.8)[0] is False
    assert choose_kernel("block", 0.3)[0] is False
    assert choose_kernel("unstructured", 0.9) == (True, "CSR kernel")
    use, label = choose_kernel("2:4", 0.5, "meta")
    assert not use and "CPU and CUDA only" in label
    assert choose_kernel("2:4", 0.5, "cuda", torch.bfloat16)[0] is True
    assert choose_kernel("2:4", 0.5, "cuda", torch.float32)[0] is False
    assert choose_kernel("block", 0.9, "cuda")[0] is True
    assert choose_kernel("block", 0.8, "cuda")[0] is False
    assert choose_kernel("unstructured", 0.99, "cuda")[0] is False


# --- the state-dict contract (issue 9 items 8, 15, 22; issue 10 item 2; issue 12) ---

def positions_24(indices, half):
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
    return ((indices[..., None] >> shifts) & 3).reshape(indices.shape[0], -1)[:, :half]


def pack_24(pos):
    p = nn.functional.pad(pos.to(torch.uint8), (0, (-pos.shape[1]) % 4)).reshape(pos.shape[0], -1, 4)
    return p[..., 0] | (p[..., 1] << 2) | (p[..., 2] << 4) | (p[..., 3] << 6)


def test_24_load_refuses_duplicate_positions():
    sp = SparseLinear.from_linear(pruned_linear("2:4", {}, k=72), pattern="2:4")
    before = {k: v.clone() for k, v in sp.state_dict().items()}
    sd = {k: v.clone() for k, v in sp.state_dict().items()}
    pos = positions_24(sd["indices"], 36)
    pos[3, 7] = pos[3, 6]  # group 3 of row 3 names one column twice
    sd["indices"] = pack_24(pos)
    with pytest.raises(RuntimeError, match=r"'indices'.*twice"):
        sp.load_state_dict(sd)
    assert all(torch.equal(before[k], v) for k, v in sp.state_dict().items())


def unordered_state(sp):
    """sp's state dict with p1 < p0 (values swapped with them) in about half the groups."""
    sd = {k: v.clone() for k, v in sp.state_dict().items()}
    pos = positions_24(sd["indices"], 36).reshape(48, 18, 2)
    values = sd["values"].reshape(48, 18, 2)
    swap = torch.rand(48, 18) < 0.5  # p1 < p0 in about half the groups, values swapped with them
    pos = torch.where(swap[..., None], pos.flip(2), pos)
    values = torch.where(swap[..., None], values.flip(2), values)
    sd["indices"], sd["values"] = pack_24(pos.reshape(48, 36)), values.reshape(48, 36)
    assert not torch.equal(sd["indices"], sp.indices)
    return sd


@pytest.mark.parametrize("train_values", [False, True])
def test_24_load_canonicalizes_unordered_positions(isa, train_values):
    sp = SparseLinear.from_linear(pruned_linear("2:4", {}, k=72), pattern="2:4")
    x = torch.randn(5, 72)
    expected, dense = sp(x), sp.dense_weight()
    sd = unordered_state(sp)
    original = {k: v.clone() for k, v in sd.items()}
    fresh = SparseLinear(72, 48, pattern="2:4", train_values=train_values)
    fresh.load_state_dict(sd)
    assert all(torch.equal(original[k], v) for k, v in sd.items())  # the caller's dict is not changed
    assert torch.equal(fresh.indices, sp.indices) and torch.equal(fresh.values.detach(), sp.values)
    torch.testing.assert_close(fresh(x), expected, atol=0, rtol=0)
    torch.testing.assert_close(fresh.dense_weight(), dense, atol=0, rtol=0)
    torch.testing.assert_close(fresh.to_linear()(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_24_unordered_positions_give_the_same_output_on_cuda(dtype):
    # The mma.sp metadata must be ordered: canonical on load, CUDA agrees with the dense weight.
    sp = SparseLinear.from_linear(pruned_linear("2:4", {}, k=72), pattern="2:4")
    sd = unordered_state(sp)
    fresh = SparseLinear(72, 48, pattern="2:4").to("cuda", dtype)
    fresh.load_state_dict({k: v.to("cuda") for k, v in sd.items()})  # canonicalized on the GPU
    x = torch.randn(5, 72)
    expected = x.double() @ sp.dense_weight().double().t() + sp.bias.detach().double()
    out = fresh(x.to("cuda", dtype)).double().cpu()
    torch.testing.assert_close(out, expected, atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(fresh.dense_weight().double().cpu(), sp.dense_weight().to(dtype).double())


def test_24_fresh_module_has_valid_metadata():
    fresh = SparseLinear(40, 8, pattern="2:4")
    pos = positions_24(fresh.indices, 20).reshape(8, 10, 2)
    assert (pos[..., 0] < pos[..., 1]).all()
    SparseLinear(40, 8, pattern="2:4").load_state_dict(fresh.state_dict())


@pytest.mark.parametrize("pattern, kw", CASES)
def test_load_refuses_another_shape_before_touching_anything(pattern, kw):
    sp = SparseLinear.from_linear(pruned_linear(pattern, kw, k=64, n=32), pattern=pattern, **kw)
    other = SparseLinear.from_linear(pruned_linear(pattern, kw, k=64, n=64), pattern=pattern, **kw)
    before = {k: v.clone() for k, v in sp.state_dict().items()}
    state = other.state_dict()
    del state["bias"]  # bias would be caught by torch's own check; the stored weight must be too
    with pytest.raises(RuntimeError, match="shape|rows|entries"):
        sp.load_state_dict(state, strict=False)
    assert {k: v.shape for k, v in sp.state_dict().items()} == {k: v.shape for k, v in before.items()}
    assert all(torch.equal(before[k], v) for k, v in sp.state_dict().items())
    assert sp(torch.randn(2, 64)).shape == (2, 32)


@pytest.mark.parametrize("pattern, kw", [c for c in CASES if c[0] != "2:4"])
def test_load_refuses_malformed_compressed_indices(pattern, kw):
    sp = SparseLinear.from_linear(pruned_linear(pattern, kw), pattern=pattern, **kw)
    cols = 64 // kw.get("block", (1, 1))[1]
    for key, corrupt, match in [("col", lambda t: t.fill_(cols), "col"),
                                ("col", lambda t: t.fill_(-1), "col"),
                                ("crow", lambda t: t.__setitem__(-1, t[-1] + 1), "crow"),
                                ("crow", lambda t: t.__setitem__(1, t[-1] + 1), "crow")]:
        sd = {k: v.clone() for k, v in sp.state_dict().items()}
        corrupt(sd[key])
        with pytest.raises(RuntimeError, match=match):
            SparseLinear(64, 48, pattern=pattern, **kw).load_state_dict(sd)


# issue 9 #22: an int64 column index of 2**32 + c must not wrap to c in the int32 buffer.
@pytest.mark.parametrize("pattern, kw", [c for c in CASES if c[0] != "2:4"])
def test_load_refuses_int64_column_indices_that_would_wrap(pattern, kw):
    sp = SparseLinear.from_linear(pruned_linear(pattern, kw), pattern=pattern, **kw)
    sd = {k: v.clone() for k, v in sp.state_dict().items()}
    sd["col"] = sd["col"].to(torch.int64) + 2**32
    fresh = SparseLinear(64, 48, pattern=pattern, **kw)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(RuntimeError, match="col"):
        fresh.load_state_dict(sd)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_meta_input_with_cpu_weights_raises():
    sp = SparseLinear.from_linear(pruned_linear("unstructured", {}), pattern="unstructured")
    with pytest.raises(RuntimeError, match="meta"):
        sp(torch.randn(2, 64, device="meta"))


@pytest.mark.parametrize("pattern, kw", [c for c in CASES if c[0] != "2:4"])
def test_from_linear_warns_on_an_unpruned_layer(pattern, kw):
    with pytest.warns(UserWarning, match="prune"):
        sp = SparseLinear.from_linear(nn.Linear(64, 48), pattern=pattern, **kw)
    assert sp.sparsity == 0


def test_to_linear_restores_requires_grad():
    lin = pruned_linear("2:4", {}).requires_grad_(False)
    back = SparseLinear.from_linear(lin, pattern="2:4").to_linear()
    assert not back.weight.requires_grad and not back.bias.requires_grad
