"""patch(model) swaps nn.Linear layers for peft_ext modules in place and
reports what changed; unpatch(model) puts plain layers back."""
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Union

from torch import nn

from .nn.int8_linear import Int8Linear, _is_conv1d
from .ops import FLOAT_DTYPES

QUANTIZE_MODES = {"int8": "dynamic", "int8_weight_only": "weight_only"}
PATCHED_TYPES = (Int8Linear,)
# int32 sums of int8 products stay exact up to this many input features.
MAX_DYNAMIC_IN_FEATURES = 133144


@dataclass
class Replaced:
    name: str
    old_type: str
    new_type: str
    in_features: int
    out_features: int
    bytes_before: int
    bytes_after: int


@dataclass
class Skipped:
    name: str
    type: str
    reason: str


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


@dataclass
class PatchReport:
    """What patch()/unpatch() changed. `print(report)` shows a table."""

    replaced: List[Replaced] = field(default_factory=list)
    skipped: List[Skipped] = field(default_factory=list)

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.replaced)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.replaced)

    def __len__(self):
        return len(self.replaced)

    def __str__(self):
        rows = [("module", "from", "to", "shape (out x in)", "bytes before", "bytes after")]
        rows += [(r.name, r.old_type, r.new_type, f"{r.out_features} x {r.in_features}",
                  _human(r.bytes_before), _human(r.bytes_after)) for r in self.replaced]
        lines = _table(rows)
        if self.skipped:
            lines.append("")
            lines += _table([("left alone", "type", "reason")] +
                            [(s.name, s.type, s.reason) for s in self.skipped])
        ratio = self.bytes_before / self.bytes_after if self.bytes_after else float("nan")
        lines.append("")
        lines.append(f"replaced {len(self.replaced)} module(s), left {len(self.skipped)} alone; "
                     f"weights {_human(self.bytes_before)} -> {_human(self.bytes_after)} ({ratio:.2f}x smaller)")
        return "\n".join(lines)


def _table(rows):
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out


def _matches(name: str, patterns) -> bool:
    """HF peft's rule: a string is a regex that must match the full name; a list
    matches a name exactly or as a dotted suffix."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _param_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def _children(model):
    """(parent, attribute name, full name, child) for every module edge, so a
    layer shared by two parents is swapped in both."""
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        # _modules, not named_children(): the latter hides repeated children.
        for child_name, child in parent._modules.items():
            if child is None:
                continue
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            yield parent, child_name, full, child


def _output_head(model):
    getter = getattr(model, "get_output_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        return None


def _is_linear(module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _skip_reason(name, module, mode, target_modules, exclude_modules, filter_fn, min_params, head):
    if _matches(name, exclude_modules):
        return "excluded (exclude_modules)"
    if target_modules is not None and not _matches(name, target_modules):
        return "not in target_modules"
    if filter_fn is not None and not filter_fn(name, module):
        return "rejected by filter_fn"
    if head is not None and module is head:
        return "output head"
    weight = module.weight
    if weight.dtype not in FLOAT_DTYPES:
        return f"unsupported dtype {weight.dtype}"
    if weight.is_meta:
        return "weights on the meta device"
    if weight.numel() < min_params:
        return f"too small ({weight.numel()} weights < min_params={min_params})"
    in_features = weight.shape[0] if _is_conv1d(module) else weight.shape[1]
    if mode == "dynamic" and in_features > MAX_DYNAMIC_IN_FEATURES:
        return f"in_features={in_features} could overflow int32 sums; use int8_weight_only"
    return None


def patch(
    model: nn.Module,
    quantize: str = "int8",
    target_modules: Optional[Union[str, Iterable[str]]] = None,
    exclude_modules: Optional[Union[str, Iterable[str]]] = ("lm_head",),
    filter_fn: Optional[Callable[[str, nn.Module], bool]] = None,
    min_params: int = 1024,
    offload: Optional[dict] = None,
) -> PatchReport:
    """Replace matching nn.Linear (and transformers Conv1D) modules in place.

    quantize: "int8" (W8A8, activations quantized per token) or
        "int8_weight_only" (activations stay float).
    target_modules / exclude_modules: HF peft rules (exact name or dotted
        suffix; a string is a regex that must match the whole name).
    filter_fn(name, module) -> bool: a last say on each candidate.
    min_params: layers with fewer weights are left alone (too small to gain).
    The model's output head (get_output_embeddings(), or "lm_head") is kept.
    offload: keyword arguments of peft_ext.offload(), run after the swap (int8
        layers then stream half the bytes); the Offloader is `report.offload`.
    """
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {sorted(QUANTIZE_MODES)}, got {quantize!r}")
    mode = QUANTIZE_MODES[quantize]
    if _is_linear(model):
        raise ValueError("patch() swaps submodules; the model itself is a Linear: wrap it in a module first")
    head = _output_head(model)
    report = PatchReport()
    decided = {}
    for parent, attr, name, child in list(_children(model)):
        if not _is_linear(child):
            continue
        if id(child) not in decided:
            reason = _skip_reason(name, child, mode, target_modules, exclude_modules, filter_fn,
                                  min_params, head)
            if reason is not None:
                report.skipped.append(Skipped(name, type(child).__name__, reason))
                decided[id(child)] = None
            else:
                new = Int8Linear.from_linear(child, mode=mode)
                new.train(child.training)
                report.replaced.append(Replaced(name, type(child).__name__, f"Int8Linear[{mode}]",
                                                new.in_features, new.out_features,
                                                _param_bytes(child), _param_bytes(new)))
                decided[id(child)] = new
        if decided[id(child)] is not None:
            setattr(parent, attr, decided[id(child)])
    if offload is not None:
        from .offload import offload as offload_model

        report.offload = offload_model(model, **offload)
    return report


def unpatch(model: nn.Module) -> PatchReport:
    """Put plain nn.Linear (or Conv1D) modules back, with dequantized weights,
    under the same names and state-dict keys."""
    report = PatchReport()
    restored = {}
    for parent, attr, name, child in list(_children(model)):
        if not isinstance(child, PATCHED_TYPES):
            continue
        if id(child) not in restored:
            layer = child.to_linear()
            layer.train(child.training)
            restored[id(child)] = layer
            report.replaced.append(Replaced(name, type(child).__name__, type(layer).__name__,
                                            child.in_features, child.out_features,
                                            _param_bytes(child), _param_bytes(layer)))
        setattr(parent, attr, restored[id(child)])
    return report
