"""Hugging Face transformers: load, save and reload peft_ext-patched models.

Importing this module registers the quantization method "peft_ext" with
transformers (peft_ext does so by itself when transformers is imported):

    from peft_ext.integrations.transformers import PeftExtConfig
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=PeftExtConfig(quantize="int8"))
    model.save_pretrained(d)                       # config.json names the method and the patched layers
    model = AutoModelForCausalLM.from_pretrained(d)  # patched again, bit-identical int8 weights

A model patched with peft_ext.patch() outside from_pretrained gets the same
save format after `attach(model)`.

Format: the patched layers keep their state-dict keys (`weight` int8,
`weight_scale` float32, `bias`), but the int8 `weight` is stored flattened to
one dimension. A loader that does not know peft_ext (transformers without it,
sentence-transformers, a plain load_state_dict) then fails with a size
mismatch on that key instead of loading int8 values as float weights.
"""
import logging

import torch
from transformers import PreTrainedModel
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

import peft_ext
from peft_ext.nn import Int8Linear

log = logging.getLogger(__name__)

METHOD = "peft_ext"
# quantize= value -> Int8Linear mode; the names patch() takes.
MODES = {"int8": "dynamic", "int8_weight_only": "weight_only"}
FORMAT_VERSION = 1


class PeftExtConfig(QuantizationConfigMixin):
    """Quantization config for `from_pretrained(..., quantization_config=PeftExtConfig(...))`.

    quantize: "int8" (W8A8) or "int8_weight_only".
    target_modules, exclude_modules, min_params: as in peft_ext.patch (the
        model's output head is always kept).
    modules: filled in when the model is patched: {layer name: {"mode":
        "dynamic" | "weight_only", "source": "linear" | "conv1d"}}. Saved in
        config.json; a checkpoint that has it is rebuilt layer by layer, so
        loading never depends on the selection rules giving the same answer.

    Example:
        >>> from peft_ext.integrations.transformers import PeftExtConfig
        >>> PeftExtConfig(quantize="int8_weight_only").quant_method
        'peft_ext'
    """

    def __init__(self, quantize="int8", target_modules=None, exclude_modules=("lm_head",), min_params=1024,
                 modules=None, format_version=FORMAT_VERSION, **kwargs):
        if quantize not in MODES:
            raise ValueError(f"quantize must be one of {sorted(MODES)}, got {quantize!r}")
        if format_version != FORMAT_VERSION:
            raise ValueError(f"this peft_ext reads checkpoint format {FORMAT_VERSION}, the checkpoint has "
                             f"format_version={format_version!r}: install the peft_ext that wrote it")
        kwargs.pop("quant_method", None)
        if kwargs:
            log.warning("PeftExtConfig: ignoring unknown fields %s", sorted(kwargs))
        self.quant_method = METHOD
        self.quantize = quantize
        self.target_modules = list(target_modules) if isinstance(target_modules, (list, tuple)) else target_modules
        self.exclude_modules = (list(exclude_modules) if isinstance(exclude_modules, (list, tuple))
                                else exclude_modules)
        self.min_params = int(min_params)
        self.modules = dict(modules) if modules else None
        self.format_version = format_version


def _patched_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, Int8Linear)}


def _layer_table(model):
    return {name: {"mode": m.mode, "source": m._source} for name, m in _patched_layers(model).items()}


def _split(name):
    parent, _, attr = name.rpartition(".")
    return parent, attr


def _flatten_weights(model, state_dict):
    """The save format: each Int8Linear weight flattened (see the module docstring)."""
    state_dict = dict(state_dict)
    for name in _patched_layers(model):
        key = f"{name}.weight" if name else "weight"
        if key in state_dict:
            state_dict[key] = state_dict[key].reshape(-1)
    return state_dict


class PeftExtHfQuantizer(HfQuantizer):
    """Patches a float checkpoint after it is loaded, or rebuilds the patched
    layers of a peft_ext checkpoint before its weights are loaded."""

    requires_calibration = False

    def _process_model_before_weight_loading(self, model, **kwargs):
        if not self.pre_quantized:
            return model
        table = self.quantization_config.modules
        if not table:
            raise ValueError("this checkpoint's quantization_config (peft_ext) lists no patched layers "
                             "('modules'); it was not written by peft_ext's save path")
        for name, spec in table.items():
            parent_name, attr = _split(name)
            parent = model.get_submodule(parent_name)
            old = getattr(parent, attr, None)
            if old is None:
                raise ValueError(f"the checkpoint patches layer {name!r}, which this model does not have")
            if spec.get("source") == "conv1d":
                in_features, out_features = old.weight.shape
            else:
                out_features, in_features = old.weight.shape
            dtype = old.bias.dtype if getattr(old, "bias", None) is not None else old.weight.dtype
            new = Int8Linear(in_features, out_features, bias=getattr(old, "bias", None) is not None,
                             mode=spec["mode"], device="meta", dtype=dtype)
            new._source = spec.get("source", "linear")
            # The checkpoint stores the weight flattened; loaded as such, reshaped after.
            new.weight = torch.empty(out_features * in_features, dtype=torch.int8, device="meta")
            setattr(parent, attr, new)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        config = self.quantization_config
        if self.pre_quantized:
            for name, module in _patched_layers(model).items():
                if module.weight.is_meta:
                    raise ValueError(f"the checkpoint has no int8 weight for {name!r}")
                if module.weight.dim() == 1:
                    module.weight = module.weight.reshape(module.out_features, module.in_features)
                if module.weight.dtype != torch.int8:
                    raise TypeError(f"{name}.weight loaded as {module.weight.dtype}, expected int8")
                module.weight_scale = module.weight_scale.float()
            return model
        peft_ext.patch(model, quantize=config.quantize, target_modules=config.target_modules,
                       exclude_modules=config.exclude_modules, min_params=config.min_params)
        config.modules = _layer_table(model)  # patch() did so too (sync); this does not rely on it
        return model

    def get_state_dict_and_metadata(self, model):
        return _flatten_weights(model, model.state_dict()), {"peft_ext_format": str(FORMAT_VERSION)}

    def is_serializable(self):
        return True

    @property
    def is_trainable(self):
        return True

    @property
    def is_compileable(self):
        return True

    def _dequantize(self, model, dtype=None):
        peft_ext.unpatch(model)
        return model.to(dtype) if dtype is not None else model


def attach(model, quantize=None):
    """Give a model patched with peft_ext.patch() the save format of a model
    loaded with PeftExtConfig, so that save_pretrained writes the int8 layers
    and config.json, and from_pretrained (or sentence-transformers) loads it
    back patched. Returns the model. `quantize` is recorded for layers patched
    later; the patched layers themselves are read from the model.

    Example:
        >>> import torch, peft_ext
        >>> from transformers import BertConfig, BertModel
        >>> from peft_ext.integrations.transformers import attach
        >>> model = BertModel(BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
        ...                              intermediate_size=128, vocab_size=100))
        >>> _ = peft_ext.patch(model)
        >>> attach(model).config.quantization_config.quant_method
        'peft_ext'
    """
    table = _layer_table(model)
    if not table:
        raise ValueError("attach(model): the model has no peft_ext Int8Linear layers; patch it first")
    modes = {spec["mode"] for spec in table.values()}
    if quantize is None:
        quantize = "int8_weight_only" if modes == {"weight_only"} else "int8"
    quantizer = getattr(model, "hf_quantizer", None)
    if isinstance(quantizer, PeftExtHfQuantizer):  # loaded with PeftExtConfig: keep its settings
        config = quantizer.quantization_config
        config.modules = table
    else:
        config = PeftExtConfig(quantize=quantize, modules=table)
        quantizer = PeftExtHfQuantizer(config, pre_quantized=True)
    model.config.quantization_config = config
    # Only what save_pretrained reads. Not `is_quantized`: transformers then
    # refuses model.half() and Trainer fine-tuning, which patched layers support.
    model.hf_quantizer = quantizer
    return model


def detach(model):
    """Forget the peft_ext quantization config (after unpatch(): the model saves as float again).

    Example:
        >>> from transformers import GPT2Config, GPT2Model
        >>> from peft_ext.integrations.transformers import detach
        >>> model = GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
        >>> hasattr(detach(model).config, "quantization_config")
        False
    """
    if isinstance(getattr(model.config, "quantization_config", None), PeftExtConfig):
        del model.config.quantization_config
    if isinstance(getattr(model, "hf_quantizer", None), PeftExtHfQuantizer):
        del model.hf_quantizer
        model.is_quantized = False
        if hasattr(model, "quantization_method"):
            del model.quantization_method
    return model


def sync(model):
    """Called by peft_ext.patch() and unpatch(): every transformers model in
    `model` (itself, or for example a sentence-transformers Transformer's
    auto_model) that holds Int8Linear layers gets attach(), one that no longer
    does gets detach(). Without this, save_pretrained of a patched model would
    write int8 weights that a plain from_pretrained loads as floats.

    Example:
        >>> import peft_ext
        >>> from transformers import GPT2Config, GPT2Model
        >>> model = GPT2Model(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=50))
        >>> _ = peft_ext.patch(model)              # calls sync(model)
        >>> sorted(model.config.quantization_config.modules)[:2]
        ['h.0.attn.c_attn', 'h.0.attn.c_proj']
        >>> _ = peft_ext.unpatch(model)
        >>> hasattr(model.config, "quantization_config")
        False
    """
    for hf_model in _outermost_hf_models(model):
        if _layer_table(hf_model):
            attach(hf_model)
        else:
            detach(hf_model)


def _outermost_hf_models(model):
    """transformers models in `model`, not descending into one once found (its
    config describes its submodules too)."""
    if isinstance(model, PreTrainedModel):
        return [model]
    return [m for child in model.children() for m in _outermost_hf_models(child)]


def _register():
    # Re-importing (importlib.reload, two copies on sys.path) must not fail on
    # the registries' "already registered" checks.
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(METHOD) is None:
        register_quantization_config(METHOD)(PeftExtConfig)
    else:
        AUTO_QUANTIZATION_CONFIG_MAPPING[METHOD] = PeftExtConfig
    if AUTO_QUANTIZER_MAPPING.get(METHOD) is None:
        register_quantizer(METHOD)(PeftExtHfQuantizer)
    else:
        AUTO_QUANTIZER_MAPPING[METHOD] = PeftExtHfQuantizer


_register()
