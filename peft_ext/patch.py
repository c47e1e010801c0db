"""patch(model) swaps nn.Linear layers for peft_ext modules in place and
reports what changed; unpatch(model) puts plain layers back."""
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Union

from torch import nn

from .integrations._lazy import after_patch
from .nn.int8_linear import Int8Linear, _is_conv1d
from .nn.sparse_linear import PATTERNS as SPARSE_PATTERNS, SparseLinear, choose_kernel
from .ops import FLOAT_DTYPES

QUANTIZE_MODES = {"int8": "dynamic", "int8_weight_only": "weight_only"}
PATCHED_TYPES = (Int8Linear, SparseLinear)
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
    sparsity: Optional[float] = None  # set when patch() pruned the layer
    kernel: str = ""  # which kernel runs a pruned layer, and why


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
    pruned: Optional[object] = None  # the PruneReport when patch() pruned
    offload: Optional[object] = None  # the Offloader when patch(offload=...) ran

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.replaced)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.replaced)

    def __len__(self):
        return len(self.replaced)

    def __str__(self):
        sparse = any(r.sparsity is not None for r in self.replaced)
        extra = ("sparsity", "kernel") if sparse else ()
        rows = [("module", "from", "to", "shape (out x in)", "bytes before", "bytes after") + extra]
        rows += [(r.name, r.old_type, r.new_type, f"{r.out_features} x {r.in_features}",
                  _human(r.bytes_before), _human(r.bytes_after)) +
                 ((f"{100 * (r.sparsity or 0):.1f}%", r.kernel) if sparse else ()) for r in self.replaced]
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
    quantize: Optional[str] = None,
    target_modules: Optional[Union[str, Iterable[str]]] = None,
    exclude_modules: Optional[Union[str, Iterable[str]]] = ("lm_head",),
    filter_fn: Optional[Callable[[str, nn.Module], bool]] = None,
    min_params: int = 1024,
    sparsity: Optional[float] = None,
    pattern: str = "2:4",
    score: str = "magnitude",
    calib_data=None,
    block=(16, 16),
    offload: Optional[dict] = None,
) -> PatchReport:
    """Replace matching nn.Linear (and transformers Conv1D) modules in place.

    quantize: "int8" (W8A8, activations quantized per token) or
        "int8_weight_only" (activations stay float). None means "int8" when
        sparsity is None, and no quantization when pruning.
    target_modules / exclude_modules: HF peft rules (exact name or dotted
        suffix; a string is a regex that must match the whole name).
    filter_fn(name, module) -> bool: a last say on each candidate.
    min_params: layers with fewer weights are left alone (too small to gain).
    sparsity, pattern, score, calib_data, block: prune the chosen layers first
        (see peft_ext.prune) and swap in SparseLinear where its kernel beats
        dense for the pattern and sparsity; other pruned layers stay dense
        (masked during later training) and the report says so. With quantize
        too, pruned weights are quantized to Int8Linear (dense int8 kernel:
        the zeros are stored and multiplied).
    The model's output head (get_output_embeddings(), or "lm_head") is kept.
    offload: keyword arguments of peft_ext.offload(), run after the swap (int8
        layers then stream half the bytes); the Offloader is `report.offload`.
    """
    if quantize is None and sparsity is None:
        quantize = "int8"
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {sorted(QUANTIZE_MODES)}, got {quantize!r}")
    mode = QUANTIZE_MODES.get(quantize)
    if sparsity is not None and mode is None and pattern not in SPARSE_PATTERNS:
        raise ValueError(f"pattern {pattern!r} has no sparse kernel; use one of {SPARSE_PATTERNS}, "
                         f"or quantize='int8' to keep the pruned weights in a dense int8 layer")
    if _is_linear(model):
        raise ValueError("patch() swaps submodules; the model itself is a Linear: wrap it in a module first")
    head = _output_head(model)
    report = PatchReport()
    chosen = {}
    for parent, attr, name, child in list(_children(model)):
        if not _is_linear(child) or id(child) in chosen:
            continue
        reason = _skip_reason(name, child, mode, target_modules, exclude_modules, filter_fn,
                              min_params, head)
        if reason is not None:
            report.skipped.append(Skipped(name, type(child).__name__, reason))
            chosen[id(child)] = None
        else:
            chosen[id(child)] = name
    pruned = {}
    if sparsity is not None:
        from .prune import prune

        names = [n for n in chosen.values() if n is not None]
        report.pruned = prune(model, sparsity=sparsity, pattern=pattern, score=score, calib_data=calib_data,
                              target_modules=names, exclude_modules=None, block=block, masked_training=False)
        pruned = {r.name: (r, report.pruned.masks[r.name]) for r in report.pruned.layers}
    decided = {}
    for parent, attr, name, child in list(_children(model)):
        if not _is_linear(child) or chosen.get(id(child)) is None:
            continue
        if id(child) not in decided:
            decided[id(child)] = _convert(child, chosen[id(child)], mode, pruned, pattern, block, report)
        setattr(parent, attr, decided[id(child)])
    if offload is not None:
        from .offload import offload as offload_model

        report.offload = offload_model(model, **offload)
    after_patch(model)
    return report


def _convert(child, name, mode, pruned, pattern, block, report):
    """The replacement for one chosen layer (the layer itself when it stays dense)."""
    from .prune import _MaskHandle

    before = _param_bytes(child)
    sparsity, kernel = None, ""
    if name in pruned:
        layer_report, mask = pruned[name]
        sparsity = layer_report.sparsity
        if mode is not None:
            kernel = "int8 dense kernel (zeros stored and multiplied)"
        else:
            use_sparse, kernel = choose_kernel(pattern, sparsity, child.weight.device, child.weight.dtype)
            if not use_sparse:
                # Masked training keeps a dense pruned layer's zeros; the
                # handle lives as long as the weight does.
                _MaskHandle(child.weight, mask.t() if _is_conv1d(child) else mask)
                layer_report.path = kernel
                out_f, in_f = mask.shape
                report.replaced.append(Replaced(name, type(child).__name__, type(child).__name__ + "[pruned]",
                                                in_f, out_f, before, before, sparsity, kernel))
                return child
        layer_report.path = kernel
    if mode is not None:
        new = Int8Linear.from_linear(child, mode=mode)
        label = f"Int8Linear[{mode}]"
    else:
        new = SparseLinear.from_linear(child, pattern=pattern, mask=mask, block=block)
        label = f"SparseLinear[{pattern}]"
    new.train(child.training)
    report.replaced.append(Replaced(name, type(child).__name__, label, new.in_features, new.out_features,
                                    before, _param_bytes(new), sparsity, kernel))
    return new


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
    after_patch(model)
    return report
