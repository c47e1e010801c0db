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


def select_linears(model, target_modules=None, exclude_modules=None, filter_fn=None):
    """(name, module, reason) for every distinct Linear / Conv1D of the model,
    in walk order, named by its first edge; reason is None for a chosen layer,
    else why it is left alone. The output head is never chosen."""
    head = output_head(model)
    seen = set()
    for _, _, name, child in list(children(model)):
        if not is_linear(child) or id(child) in seen:
            continue
        seen.add(id(child))
        yield name, child, _reason(name, child, target_modules, exclude_modules, filter_fn, head)


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
