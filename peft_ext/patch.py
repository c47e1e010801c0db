"""patch(model) swaps nn.Linear layers for peft_ext modules in place and
reports what changed; unpatch(model) puts plain layers back."""
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Union

from torch import nn

from .integrations._lazy import after_patch
from ._modules import children, is_conv1d, is_linear, is_tuner_layer, select_linears, swap_blockers
from ._report import human_bytes, table
from .masking import MaskHandle
from .nn.int8_linear import Int8Linear
from .nn.sparse_linear import PATTERNS as SPARSE_PATTERNS, SparseLinear, choose_kernel
from .offload import offload as offload_model
from .ops import FLOAT_DTYPES, build_info
from .prefetch import resolve_device
from .prune import prune as prune_model

QUANTIZE_MODES = {"int8": "dynamic", "int8_weight_only": "weight_only"}
PATCHED_TYPES = (Int8Linear, SparseLinear)
# int32 sums of int8 products stay exact up to this many input features.
MAX_DYNAMIC_IN_FEATURES = int(build_info()["max_exact_k"])  # C++ kMaxExactK


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
        lines.append("")
        summary = f"replaced {len(self.replaced)} module(s), left {len(self.skipped)} alone"
        if self.replaced and self.bytes_after:
            summary += (f"; weights {human_bytes(self.bytes_before)} -> {human_bytes(self.bytes_after)} "
                        f"({self.bytes_before / self.bytes_after:.2f}x smaller)")
        return "\n".join(lines + [summary])


def _param_bytes(module, counted=None) -> int:
    """Bytes of the module's tensors; with `counted` (a set of tensor ids, updated)
    a tensor shared with an already counted module (tied weights) counts once."""
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if counted is not None:
            if id(t) in counted:
                continue
            counted.add(id(t))
        total += t.numel() * t.element_size()
    return total


# Module hook dictionaries a replacement takes over (the same dict objects, so
# the handles given out for the old module still remove the hooks), as
# torch.ao's module swap carries forward hooks and pre-hooks.
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
               "_backward_hooks")


def _carry_hooks(old, new):
    for name in _HOOK_DICTS:
        hooks = getattr(old, name, None)
        if hooks:
            setattr(new, name, hooks)
    if getattr(old, "_is_full_backward_hook", None) is not None:
        new._is_full_backward_hook = old._is_full_backward_hook


class _MergeRefused:
    """Stands in for a peft tuner layer's merge() while its base layer is one of
    ours: peft's merge adds float deltas into base_layer.weight, which is int8
    here. A class (not a closure) so the model still pickles."""

    def __init__(self, name):
        self.name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"peft_ext: cannot merge the adapter of '{self.name}' into its patched base layer "
                           f"(Int8Linear / SparseLinear have no float weight to add to). Call "
                           f"peft_ext.unpatch(model) first, then merge_and_unload(), then peft_ext.patch() "
                           f"the merged model again")


def _check_offload(offload):
    """patch(offload=...) checked before any layer changes: offload()'s own
    argument checks, which would otherwise run after the swap."""
    if offload is None:
        return
    if not isinstance(offload, dict):
        raise TypeError(f"offload must be a dict of peft_ext.offload() keyword arguments, "
                        f"got {type(offload).__name__}")
    allowed = set(inspect.signature(offload_model).parameters) - {"model"}
    unknown = sorted(set(offload) - allowed)
    if unknown:
        raise TypeError(f"offload={{...}} got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                        f"peft_ext.offload() takes {', '.join(sorted(allowed))}")
    prefetch = offload.get("prefetch", 2)
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1:
        raise ValueError(f"offload prefetch must be an int >= 1, got {prefetch!r}")
    budget = offload.get("max_resident_bytes")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
        raise ValueError(f"offload max_resident_bytes must be an int >= 0 or None, got {budget!r}")
    device = offload.get("device", inspect.signature(offload_model).parameters["device"].default)
    if device is not None:
        try:
            resolve_device(device)
        except RuntimeError as e:  # torch.device's own message for a bad string
            raise ValueError(f"offload device={device!r}: {e}") from None


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
    Also left alone, with the reason in the report: nn.Linear subclasses that
    override forward; layers whose parent reads their weight itself
    (MultiheadAttention's out_proj, TransformerEncoderLayer's linear1/linear2,
    the base layer of a peft DoRA layer); HF peft adapters (lora_A, lora_B,
    modules_to_save, ...: float and trainable; the base layers are patched,
    and the tuner layer's merge() / merge_and_unload() raises until
    unpatch()); layers whose weight is tied to a module that is not patched.
    Layers tied to each other share one int8 weight (counted once); forward
    hooks and pre-hooks move to the replacement. Every argument is checked
    before the model changes; a failure during the swap (or in offload)
    puts the original layers back (weights already pruned stay pruned).
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
    _check_offload(offload)
    if is_linear(model):
        raise ValueError("patch() swaps submodules; the model itself is a Linear: wrap it in a module first")
    report = PatchReport()
    blocked = swap_blockers(model)
    candidates = []
    for name, child, reason in select_linears(model, target_modules, exclude_modules, filter_fn):
        candidates.append([name, child, reason or blocked.get(id(child)) or _skip_reason(child, mode, min_params)])
    _leave_partly_tied(model, candidates)
    chosen = {}  # id(layer) -> its name, or None when left alone
    for name, child, reason in candidates:
        if reason is not None:
            report.skipped.append(Skipped(name, type(child).__name__, reason))
        chosen[id(child)] = None if reason else name
    pruned = {}
    if prune is not None:
        names = [n for n in chosen.values() if n is not None]
        report.pruned = prune_model(model, **prune, target_modules=names, exclude_modules=None,
                                    masked_training=False)
        pruned = {r.name: (r, report.pruned.masks[r.name]) for r in report.pruned.layers}
    state = _SwapState()
    swaps = []  # (parent, attribute, old module): undone if anything below fails
    try:
        for parent, attr, name, child in list(children(model)):
            if not is_linear(child) or chosen.get(id(child)) is None:
                continue
            if id(child) not in state.decided:
                state.decided[id(child)] = _convert(child, chosen[id(child)], mode, pruned, pattern, block,
                                                    report, state)
            new = state.decided[id(child)]
            if new is not child:
                swaps.append((parent, attr, child))
                setattr(parent, attr, new)
                if attr == "base_layer" and is_tuner_layer(parent):
                    parent.merge = _MergeRefused(_name_of(model, parent))
        if offload is not None:
            report.offload = offload_model(model, **offload)
    except BaseException:
        for parent, attr, child in reversed(swaps):
            setattr(parent, attr, child)
            if isinstance(parent.__dict__.get("merge"), _MergeRefused):
                del parent.merge
        raise
    after_patch(model)
    return report


def _name_of(model, module):
    return next((n for n, m in model.named_modules() if m is module), type(module).__name__)


def _leave_partly_tied(model, candidates):
    """A chosen layer whose weight is also held by a module that stays as it is
    (tied to an excluded layer, an embedding, ...) is left alone: quantizing
    one side would untie them and save nothing (the float weight stays)."""
    owners = {}
    for mod_name, module in model.named_modules():
        for p in module._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append((mod_name, module))
    chosen = {id(child) for _, child, reason in candidates if reason is None}
    kind = {id(child): (type(child), tuple(child.weight.shape)) for _, child, reason in candidates}
    for entry in candidates:
        name, child, reason = entry
        if reason is not None:
            continue
        for other_name, other in owners.get(id(child.weight), ()):
            if other is child:
                continue
            if id(other) not in chosen or kind[id(other)] != kind[id(child)]:
                entry[2] = (f"weight shared with '{other_name}' ({type(other).__name__}), which is not "
                            f"patched: replacing one would untie them")
                break
    # Leaving one layer alone can leave its tie partners partly tied: repeat.
    if any(e[2] is not None and id(e[1]) in chosen for e in candidates):
        _leave_partly_tied(model, candidates)


class _SwapState:
    """What patch() remembers across layers: one replacement per module, and
    the new tensors that tied old ones map to (so ties stay ties)."""

    def __init__(self):
        self.decided = {}  # id(old module) -> replacement
        self.weights = {}  # id(old weight) -> the replacement that first took it
        self.biases = {}  # id(old bias) -> new bias Parameter
        self.masked = set()  # ids of weights already given a mask handle
        self.before, self.after = set(), set()  # tensors counted in the report


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


def _convert(child, name, mode, pruned, pattern, block, report, state):
    """The replacement for one chosen layer (the layer itself when it stays dense)."""
    before = _param_bytes(child, state.before)
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
                # handle lives as long as the weight does (one per tied weight); the
                # module keeps the mask so that deepcopy carries it.
                if id(child.weight) not in state.masked:
                    state.masked.add(id(child.weight))
                    MaskHandle(child.weight, mask.t() if is_conv1d(child) else mask, child)
                layer_report.path = kernel
                out_f, in_f = mask.shape
                state.after.update(id(t) for t in list(child.parameters()) + list(child.buffers()))
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
    _tie_like(child, new, state)
    new.train(child.training)
    _carry_hooks(child, new)
    report.replaced.append(Replaced(name, type(child).__name__, label, new.in_features, new.out_features,
                                    before, _param_bytes(new, state.after), sparsity, kernel))
    return new


def _tie_like(child, new, state):
    """Give `new` the tensors already made for the old tensors `child` shares
    with a layer converted before: tied weights stay one tensor."""
    first = state.weights.setdefault(id(child.weight), new)
    if first is not new:
        for key, buf in first._buffers.items():
            if buf is not None and key in new._buffers:
                new._buffers[key] = buf
    if child.bias is not None:
        bias = state.biases.setdefault(id(child.bias), new.bias)
        if bias is not new.bias:
            new.bias = bias


def unpatch(model: nn.Module) -> PatchReport:
    """Put plain nn.Linear (or Conv1D) modules back, with dequantized weights,
    under the same names and state-dict keys, in the compute dtype, with the
    original requires_grad flags, forward hooks and weight ties."""
    report = PatchReport()
    restored = {}
    weights, biases = {}, {}  # id(patched tensor) -> restored Parameter: ties come back as ties
    before, after = set(), set()
    for parent, attr, name, child in list(children(model)):
        if not isinstance(child, PATCHED_TYPES):
            continue
        if id(child) not in restored:
            layer = child.to_linear()
            layer.train(child.training)
            key = id(child.weight if isinstance(child, Int8Linear) else child.values)
            tied = weights.setdefault(key, layer.weight)
            if tied is not layer.weight:
                layer.weight = tied
            if child.bias is not None:
                bias = biases.setdefault(id(child.bias), layer.bias)
                if bias is not layer.bias:
                    layer.bias = bias
            _carry_hooks(child, layer)
            restored[id(child)] = layer
            report.replaced.append(Replaced(name, type(child).__name__, type(layer).__name__,
                                            child.in_features, child.out_features,
                                            _param_bytes(child, before), _param_bytes(layer, after)))
        setattr(parent, attr, restored[id(child)])
        if attr == "base_layer" and isinstance(parent.__dict__.get("merge"), _MergeRefused):
            del parent.merge
    after_patch(model)
    return report
