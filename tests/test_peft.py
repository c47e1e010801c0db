"""HF peft LoRA on patched layers (peft_ext.integrations.peft): targeting,
frozen buffers, merge / unmerge / unload, adapter-only save and load. A tiny
GPT-2 built from a config (random weights, Conv1D layers, a tied lm_head)."""
import subprocess
import sys

import pytest
import torch

import peft_ext
from peft_ext import Int8Linear, SparseLinear

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft_ext.integrations.peft import Int8LoraLinear, SparseLoraLinear  # noqa: E402

KINDS = ["int8", "int8_weight_only", "2:4"]


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=2, n_positions=32, vocab_size=96)
    return transformers.GPT2LMHeadModel(config).eval()


def patched(kind, seed=0):
    model = tiny_gpt2(seed)
    if kind == "2:4":
        peft_ext.patch(model, prune=dict(sparsity=0.5, pattern="2:4"))
    else:
        peft_ext.patch(model, quantize=kind)
    return model


def base_buffers(model):
    """Every buffer of every patched layer, cloned (int8 weights, scales, sparse values and indices)."""
    return {f"{_plain(name)}.{b}": t.clone() for name, m in model.named_modules()
            if isinstance(m, (Int8Linear, SparseLinear)) for b, t in m.named_buffers(recurse=False)}


def _plain(name):
    """A module's name in the model without peft's wrappers."""
    return name.replace("base_model.model.", "", 1).replace(".base_layer", "")


def assert_same_buffers(before, model):
    after = base_buffers(model)
    assert after.keys() == before.keys()
    for key, t in before.items():
        assert torch.equal(after[key], t), key


def batch(seed=1, n=3, length=9):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 96, (n, length), generator=g)


def lora(model, target_modules=("c_attn", "c_proj"), **kwargs):
    kwargs.setdefault("init_lora_weights", False)  # B != 0: adapters change outputs from the start
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, **kwargs))


def test_import_does_not_import_peft():
    code = "import sys, peft_ext; assert 'peft' not in sys.modules, 'peft imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("kind", KINDS)
def test_target_modules_list_wraps_patched_layers(kind):
    model = patched(kind)
    pm = lora(model)
    wrapped = {n: m for n, m in pm.named_modules() if isinstance(m, (Int8LoraLinear, SparseLoraLinear))}
    # 2 blocks x (attn.c_attn, attn.c_proj, mlp.c_proj)
    assert len(wrapped) == 6, sorted(wrapped)
    layer_type = SparseLinear if kind == "2:4" else Int8Linear
    assert all(isinstance(m.get_base_layer(), layer_type) for m in wrapped.values())
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_regex_target_modules():
    pm = lora(patched("int8"), target_modules=r".*\.attn\.c_attn")
    names = [n for n, m in pm.named_modules() if isinstance(m, Int8LoraLinear)]
    assert len(names) == 2 and all(n.endswith("attn.c_attn") for n in names)


@pytest.mark.parametrize("kind", ["int8", "2:4"])
def test_all_linear_finds_patched_layers_but_not_the_head(kind):
    model = patched(kind)
    n_patched = sum(isinstance(m, (Int8Linear, SparseLinear)) for m in model.modules())
    assert n_patched == 8  # 2 blocks x (c_attn, attn.c_proj, c_fc, mlp.c_proj)
    pm = lora(model, target_modules="all-linear")
    wrapped = [n for n, m in pm.named_modules() if isinstance(m, (Int8LoraLinear, SparseLoraLinear))]
    assert len(wrapped) == n_patched
    assert not any("lm_head" in n for n, m in pm.named_modules() if hasattr(m, "lora_A"))


def test_all_linear_excludes_a_patched_head():
    model = patched("int8")
    model.lm_head = Int8Linear.from_linear(model.lm_head)
    assert model.get_output_embeddings() is model.lm_head
    pm = lora(model, target_modules="all-linear")
    assert sum(isinstance(m, Int8LoraLinear) for m in pm.modules()) == 8
    assert not hasattr(pm.base_model.model.lm_head, "lora_A")


@pytest.mark.parametrize("kind", KINDS)
def test_training_moves_adapters_only(kind):
    model = patched(kind)
    before = base_buffers(model)
    pm = lora(model)
    x = batch()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    adapters = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    for _ in range(3):
        loss = pm(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None for n, p in pm.named_parameters() if not p.requires_grad)
    assert all(not torch.equal(p, adapters[n]) for n, p in pm.named_parameters() if p.requires_grad)
    assert_same_buffers(before, pm)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_is_base_plus_low_rank_update(kind):
    model = patched(kind)
    pm = lora(model)
    layer = pm.base_model.model.transformer.h[0].attn.c_attn
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        want = layer.get_base_layer()(x) + layer.lora_B["default"](layer.lora_A["default"](x)) * 2.0
        torch.testing.assert_close(layer(x), want)


def test_merge_and_unload_int8_within_the_stated_bound():
    model = patched("int8_weight_only")
    pm = lora(model)
    layer = pm.base_model.model.transformer.h[1].mlp.c_proj
    base = layer.get_base_layer()
    exact = base.dequantized_weight().double() + layer.get_delta_weight("default").double()
    x = batch()
    with torch.no_grad():
        before = pm(input_ids=x).logits
    merged = pm.merge_and_unload()
    assert isinstance(merged.transformer.h[1].mlp.c_proj, Int8Linear)
    assert not any(hasattr(m, "lora_A") for m in merged.modules())
    w = merged.transformer.h[1].mlp.c_proj.dequantized_weight().double()
    bound = exact.abs().amax(dim=1, keepdim=True) / 254
    assert ((w - exact).abs() <= bound * (1 + 1e-5) + 1e-7).all()
    with torch.no_grad():
        after = merged(input_ids=x).logits
    cos = torch.nn.functional.cosine_similarity(after.flatten(), before.flatten(), dim=0)
    assert cos > 0.999, cos


@pytest.mark.parametrize("kind", ["2:4", "unstructured"])
def test_merge_and_unload_sparse_keeps_the_pattern(kind):
    model = tiny_gpt2()
    if kind == "2:4":
        peft_ext.patch(model, prune=dict(sparsity=0.5, pattern="2:4"))
    else:
        peft_ext.patch(model, prune=dict(sparsity=0.9, pattern="unstructured"))
    pm = lora(model)
    layer = pm.base_model.model.transformer.h[0].attn.c_attn
    base = layer.get_base_layer()
    assert isinstance(base, SparseLinear) and base.pattern == kind
    dense = base.dense_weight()
    mask = base.dense_weight().ne(0) if kind == "unstructured" else None
    structure = {n: t.clone() for n, t in base.named_buffers() if n != "values"}
    delta = layer.get_delta_weight("default").detach()
    if kind == "2:4":
        from peft_ext import formats
        mask = torch.zeros_like(dense, dtype=torch.bool).scatter_(
            1, formats.columns_24(base.indices, base.values.shape[1]), True)
    merged = pm.merge_and_unload()
    new = merged.transformer.h[0].attn.c_attn
    assert isinstance(new, SparseLinear) and new.pattern == kind
    for n, t in structure.items():
        assert torch.equal(getattr(new, n), t), n  # the pattern survives
    torch.testing.assert_close(new.dense_weight(), torch.where(mask, dense + delta, torch.zeros_like(dense)))


@pytest.mark.parametrize("kind", KINDS)
def test_unload_and_unmerge_restore_the_base_bit_for_bit(kind):
    model = patched(kind)
    before = base_buffers(model)
    x = batch()
    with torch.no_grad():
        ref = model(input_ids=x).logits
    pm = lora(model)
    pm.merge_adapter()
    merged = base_buffers(pm)
    assert any(not torch.equal(merged[k], t) for k, t in before.items())
    pm.unmerge_adapter()
    assert_same_buffers(before, pm)
    base = pm.unload()
    assert_same_buffers(before, base)
    assert not any(hasattr(m, "lora_A") for m in base.modules())
    with torch.no_grad():
        assert torch.equal(base(input_ids=x).logits, ref)


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_only_save_load_onto_a_freshly_patched_base(kind, tmp_path):
    pm = lora(patched(kind))
    x = batch()
    with torch.no_grad():
        want = pm(input_ids=x).logits
    pm.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "adapter_model.safetensors" in files
    import safetensors.torch
    saved = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)  # adapters only, no base buffers
    loaded = peft.PeftModel.from_pretrained(patched(kind), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, want)
