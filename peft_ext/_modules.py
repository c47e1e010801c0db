"""Walking a model and choosing its Linear layers. A leaf: it imports nothing
else from peft_ext, so patch, prune, offload and nn can all use it."""
import re

from torch import nn


def is_conv1d(module) -> bool:
    # transformers' GPT-2 style Conv1D: weight [in, out], y = x @ W + b.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear(module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def matches(name: str, patterns) -> bool:
    """HF peft's rule: a string is a regex that must match the full name; a list
    matches a name exactly or as a dotted suffix."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def children(model):
    """(parent, attribute name, full name, child) for every module edge, so a
    layer shared by two parents is swapped in both."""
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        # _modules, not named_children(): the latter hides repeated children.
        for child_name, child in parent._modules.items():
            if child is None:
                continue
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            yield parent, child_name, full, child


def output_head(model):
    getter = getattr(model, "get_output_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        return None


def is_tuner_layer(module) -> bool:
    """An HF peft tuner layer (LoRA, IA3, ... wrapping `base_layer`) or
    auxiliary wrapper (modules_to_save), recognised by peft's own class
    attributes so that peft need not be imported."""
    return isinstance(getattr(type(module), "adapter_layer_names", None), tuple) and (
        hasattr(module, "base_layer") or hasattr(module, "original_module"))


def reads_base_weight(tuner) -> bool:
    """A peft layer whose forward reads base_layer.weight itself (DoRA and the
    other LoRA variants), so its base layer must stay a float Linear."""
    return bool(len(getattr(tuner, "lora_magnitude_vector", ())) or getattr(tuner, "lora_variant", None)
                or any(getattr(tuner, "use_dora", {}).values()))


def _adapter_reasons(model):
    """{id(module): reason} for the modules inside peft tuner layers that are
    adapters (everything but the base_layer path; all of a modules_to_save
    wrapper): they are the trainable part and stay float."""
    out = {}
    for name, tuner in model.named_modules():
        if not is_tuner_layer(tuner):
            continue
        for child_name, child in tuner.named_children():
            if child_name == "base_layer":
                continue
            for sub in child.modules():
                out.setdefault(id(sub), f"HF peft adapter of '{name}' (stays float and trainable)")
    return out


# Parents whose forward reads these Linear children's .weight / .bias itself
# instead of calling them (None: every Linear child). MultiheadAttention hands
# out_proj.weight to F.multi_head_attention_forward; TransformerEncoderLayer's
# fused fast path (eval, no grad) reads linear1/linear2 weights.
_READS_CHILD_WEIGHTS = ((nn.MultiheadAttention, None), (nn.TransformerEncoderLayer, ("linear1", "linear2")))


def swap_blockers(model):
    """{id(layer): reason} for Linear layers that cannot be replaced by another
    module without changing what the model computes: nn.Linear subclasses with
    their own forward (it would be lost), layers whose parent reads their
    weight directly, base layers of peft layers that read the base weight."""
    out = {}
    for parent, attr, _, child in children(model):
        if not is_linear(child):
            continue
        if isinstance(child, nn.Linear) and type(child).forward is not nn.Linear.forward:
            out[id(child)] = f"{type(child).__name__} overrides forward (its own logic would be lost)"
        elif type(child).__name__ == "NonDynamicallyQuantizableLinear":
            out[id(child)] = "MultiheadAttention's out_proj: its parent reads its weight directly"
        for kind, names in _READS_CHILD_WEIGHTS:
            if isinstance(parent, kind) and (names is None or attr in names):
                out[id(child)] = f"{type(parent).__name__}'s {attr}: its parent reads its weight directly"
        if attr == "base_layer" and is_tuner_layer(parent) and reads_base_weight(parent):
            out[id(child)] = "base layer of a peft DoRA / LoRA-variant layer, which reads the base weight"
    return out


def select_linears(model, target_modules=None, exclude_modules=None, filter_fn=None):
    """(name, module, reason) for every distinct Linear / Conv1D of the model,
    in walk order, named by its first edge; reason is None for a chosen layer,
    else why it is left alone. The output head and HF peft adapters are never
    chosen."""
    head = output_head(model)
    adapters = _adapter_reasons(model)
    seen = set()
    for _, _, name, child in list(children(model)):
        if not is_linear(child) or id(child) in seen:
            continue
        seen.add(id(child))
        yield name, child, (adapters.get(id(child)) or
                            _reason(name, child, target_modules, exclude_modules, filter_fn, head))


def _reason(name, module, target_modules, exclude_modules, filter_fn, head):
    if matches(name, exclude_modules):
        return "excluded (exclude_modules)"
    if target_modules is not None and not matches(name, target_modules):
        return "not in target_modules"
    if filter_fn is not None and not filter_fn(name, module):
        return "rejected by filter_fn"
    if head is not None and module is head:
        return "output head"
    return None
