"""patch(model) swaps nn.Linear layers for peft_ext modules in place and
reports what changed; unpatch(model) puts plain layers back."""
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Union

from torch import nn

from ._modules import children, is_conv1d, is_linear, select_linears
from ._report import human_bytes, table
from .masking import MaskHandle
from .nn.int8_linear import Int8Linear
from .nn.sparse_linear import PATTERNS as SPARSE_PATTERNS, SparseLinear, choose_kernel
from .offload import offload as offload_model
from .ops import FLOAT_DTYPES
from .prune import prune as prune_model

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
                  human_bytes(r.bytes_before), human_bytes(r.bytes_after)) +
                 ((f"{100 * (r.sparsity or 0):.1f}%", r.kernel) if sparse else ()) for r in self.replaced]
        lines = table(rows)
        if self.skipped:
            lines.append("")
            lines += table([("left alone", "type", "reason")] +
                            [(s.name, s.type, s.reason) for s in self.skipped])
        ratio = self.bytes_before / self.bytes_after if self.bytes_after else float("nan")
        lines.append("")
        lines.append(f"replaced {len(self.replaced)} module(s), left {len(self.skipped)} alone; "
                     f"weights {human_bytes(self.bytes_before)} -> {human_bytes(self.bytes_after)} "
                     f"({ratio:.2f}x smaller)")
        return "\n".join(lines)


def _param_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def _skip_reason(module, mode, min_params):
    """Why a selected layer cannot be converted, or None."""
    weight = module.weight
    if weight.dtype not in FLOAT_DTYPES:
        return f"unsupported dtype {weight.dtype}"
    if weight.is_meta:
        return "weights on the meta device"
    if weight.numel() < min_params:
        return f"too small ({weight.numel()} weights < min_params={min_params})"
    in_features = weight.shape[0] if is_conv1d(module) else weight.shape[1]
    if mode == "dynamic" and in_features > MAX_DYNAMIC_IN_FEATURES:
        return f"in_features={in_features} could overflow int32 sums; use int8_weight_only"
    return None


# patch()'s flat pruning keywords before prune=dict(...); accepted, with a
# DeprecationWarning, for one release.
_OLD_PRUNE_KEYWORDS = ("sparsity", "pattern", "score", "calib_data", "block")
# prune() arguments that patch() sets itself.
_PATCH_SETS = ("model", "target_modules", "exclude_modules", "masked_training")


def patch(
    model: nn.Module,
    quantize: Optional[str] = None,
    *,
    target_modules: Optional[Union[str, Iterable[str]]] = None,
    exclude_modules: Optional[Union[str, Iterable[str]]] = ("lm_head",),
    filter_fn: Optional[Callable[[str, nn.Module], bool]] = None,
    min_params: int = 1024,
    prune: Optional[dict] = None,
    offload: Optional[dict] = None,
    **deprecated,
) -> PatchReport:
    """Replace matching nn.Linear (and transformers Conv1D) modules in place.

    quantize: "int8" (W8A8, activations quantized per token) or
        "int8_weight_only" (activations stay float). None means "int8"
        without prune, and no quantization with it.
    target_modules / exclude_modules: HF peft rules (exact name or dotted
        suffix; a string is a regex that must match the whole name).
    filter_fn(name, module) -> bool: a last say on each candidate.
    min_params: layers with fewer weights are left alone (too small to gain).
    prune: keyword arguments of peft_ext.prune() (sparsity, pattern, score,
        calib_data, block, scope, loss_fn): prune the chosen layers first and
        swap in SparseLinear where its kernel beats dense for the pattern and
        sparsity; other pruned layers stay dense (masked during later
        training) and the report says so. With quantize too, pruned weights
        are quantized to Int8Linear (dense int8 kernel: the zeros are stored
        and multiplied). The PruneReport is `report.pruned`.
    offload: keyword arguments of peft_ext.offload(), run after the swap (int8
        layers then stream half the bytes); the Offloader is `report.offload`.
    The model's output head (get_output_embeddings(), or "lm_head") is kept.
    The flat keywords sparsity=, pattern=, score=, calib_data=, block= still
    work (as prune=dict(...)) with a DeprecationWarning.
    """
    prune = _prune_options(prune, deprecated)
    if quantize is None and prune is None:
        quantize = "int8"
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {sorted(QUANTIZE_MODES)}, got {quantize!r}")
    mode = QUANTIZE_MODES.get(quantize)
    pattern, block = (prune or {}).get("pattern", "2:4"), (prune or {}).get("block", (16, 16))
    if prune is not None and mode is None and pattern not in SPARSE_PATTERNS:
        raise ValueError(f"pattern {pattern!r} has no sparse kernel; use one of {SPARSE_PATTERNS}, "
                         f"or quantize='int8' to keep the pruned weights in a dense int8 layer")
    if is_linear(model):
        raise ValueError("patch() swaps submodules; the model itself is a Linear: wrap it in a module first")
    report = PatchReport()
    chosen = {}  # id(layer) -> its name, or None when left alone
    for name, child, reason in select_linears(model, target_modules, exclude_modules, filter_fn):
        reason = reason or _skip_reason(child, mode, min_params)
        if reason is not None:
            report.skipped.append(Skipped(name, type(child).__name__, reason))
        chosen[id(child)] = None if reason else name
    pruned = {}
    if prune is not None:
        names = [n for n in chosen.values() if n is not None]
        report.pruned = prune_model(model, **prune, target_modules=names, exclude_modules=None,
                                    masked_training=False)
        pruned = {r.name: (r, report.pruned.masks[r.name]) for r in report.pruned.layers}
    decided = {}
    for parent, attr, name, child in list(children(model)):
        if not is_linear(child) or chosen.get(id(child)) is None:
            continue
        if id(child) not in decided:
            decided[id(child)] = _convert(child, chosen[id(child)], mode, pruned, pattern, block, report)
        setattr(parent, attr, decided[id(child)])
    if offload is not None:
        report.offload = offload_model(model, **offload)
    return report


def _prune_options(prune, deprecated):
    """patch()'s prune= dict (None: no pruning), from it or from the old flat keywords."""
    unknown = sorted(set(deprecated) - set(_OLD_PRUNE_KEYWORDS))
    if unknown:
        raise TypeError(f"patch() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}")
    if deprecated:
        warnings.warn(f"patch({', '.join(f'{k}=' for k in deprecated)}...) is deprecated; "
                      f"pass prune=dict({', '.join(f'{k}=...' for k in deprecated)})",
                      DeprecationWarning, stacklevel=3)
        if prune is not None:
            raise ValueError("pass the pruning options in prune=dict(...) only, not also as keywords")
        if deprecated.get("sparsity") is None:  # as before: no sparsity, no pruning
            return None
        return dict(deprecated)
    if prune is None:
        return None
    if not isinstance(prune, dict):
        raise TypeError(f"prune must be a dict of peft_ext.prune() keyword arguments, got {type(prune).__name__}")
    clash = sorted(set(prune) & set(_PATCH_SETS))
    if clash:
        raise ValueError(f"prune={{...}} cannot set {', '.join(clash)}: patch() chooses the layers itself")
    return dict(prune)


def _convert(child, name, mode, pruned, pattern, block, report):
    """The replacement for one chosen layer (the layer itself when it stays dense)."""
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
                MaskHandle(child.weight, mask.t() if is_conv1d(child) else mask, child)
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
    for parent, attr, name, child in list(children(model)):
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
