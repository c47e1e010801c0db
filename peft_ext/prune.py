"""prune(model): importance scores, N:M / block / unstructured masks, and
masked fine-tuning (pruned weights stay zero under any torch optimizer).

Scores, per weight w[n, k] of a Linear y = x @ W^T:
  magnitude  |w|
  gradient   |g| / sum |g|, g = dL/dW summed over the calibration batches
  taylor     |w * g|       (first-order Taylor estimate of the loss change)
  wanda      |w| * ||x_k|| with ||x_k|| the L2 norm of input feature k over
             every calibration token (collected by forward pre-hooks)
The loss L for gradient/taylor: loss_fn(output, batch) when given; else the
model output's `.loss` when it has one (transformers models called with
labels); else the mean squared output, i.e. the scores then measure how much
each weight moves the output's energy (a label-free proxy).

Groups compared: N:M ("2:4") keeps the N largest of every M consecutive
weights of an output row; "unstructured" prunes the lowest scores per layer
(scope="layer"), per output row (scope="row") or across all layers
(scope="global", scores normalised by each layer's sum); "block" scores each
block (bh x bw, default 16 x 16, over [out, in]) by its summed score and drops
the lowest blocks per layer.

Every comparison group keeps at least one weight: a layer (scope="layer",
"global", block), a row (scope="row"), so sparsity=0.999999 never empties a
layer. Layers that share one weight (tied, `b.weight = a.weight`) are scored
once, with the calibration of both (Wanda: the input norms of every call),
and get one mask; the report lists each name and counts the weight once.
Calibration batches and the signals they produce must be finite: NaN or inf
is refused with a ValueError before any weight changes.
"""
import weakref
import logging
from dataclasses import dataclass, field
from typing import List

import torch
from torch import nn
from torch.utils import _pytree as pytree
from tqdm import tqdm

from ._modules import is_conv1d, select_linears
from ._report import table
from .masking import MaskHandle, handles_of

log = logging.getLogger(__name__)

SCORES = ("magnitude", "gradient", "taylor", "wanda")
SCOPES = ("layer", "row", "global")


@dataclass
class PrunedLayer:
    name: str
    out_features: int
    in_features: int
    pattern: str
    score: str
    sparsity: float  # fraction of zeros reached
    path: str = ""  # filled by patch(): which kernel runs this layer
    tied_to: str = ""  # the layer this one shares its weight with (counted once)


@dataclass
class PruneReport:
    """What prune() did. `print(report)` shows a table; `remove_masks()` stops
    the masked fine-tuning hooks (the zeros stay in the weights)."""

    layers: List[PrunedLayer] = field(default_factory=list)
    masks: dict = field(default_factory=dict, repr=False)  # name -> bool mask [out, in]
    # Weak: the masks live with the model's modules, not with the report.
    _modules: list = field(default_factory=list, repr=False)

    def __len__(self):
        return len(self.layers)

    @property
    def sparsity(self) -> float:
        own = [r for r in self.layers if not r.tied_to]
        total = sum(r.out_features * r.in_features for r in own)
        zeros = sum(r.sparsity * r.out_features * r.in_features for r in own)
        return zeros / total if total else 0.0

    def remove_masks(self):
        """Stop masked training of every layer this report pruned, also those
        patch(prune=...) kept dense (any mask on their weight is removed)."""
        for ref in self._modules:
            module = ref()
            if module is not None:
                for h in handles_of(module):
                    h.remove()

    def __str__(self):
        rows = [("module", "shape (out x in)", "pattern", "score", "sparsity") +
                (("kernel",) if any(r.path for r in self.layers) else ())]
        for r in self.layers:
            rows.append((r.name, f"{r.out_features} x {r.in_features}", r.pattern, r.score,
                         f"{100 * r.sparsity:.1f}%") + ((r.path,) if len(rows[0]) == 6 else ()))
        lines = table(rows)
        lines.append(f"pruned {len(self.layers)} layer(s) to {100 * self.sparsity:.1f}% zeros overall")
        return "\n".join(lines)


def parse_pattern(pattern: str):
    """"2:4" -> ("nm", 2, 4); "block" / "unstructured" -> (pattern, None, None)."""
    if pattern in ("block", "unstructured"):
        return pattern, None, None
    if isinstance(pattern, str) and ":" in pattern:
        n, m = pattern.split(":", 1)
        if n.isdigit() and m.isdigit() and 0 < int(n) < int(m):
            return "nm", int(n), int(m)
    raise ValueError(f"pattern must be 'N:M' (e.g. '2:4'), 'block' or 'unstructured', got {pattern!r}")


def _weight_oi(module):
    """The weight as [out, in] (Conv1D stores [in, out])."""
    return module.weight.t() if is_conv1d(module) else module.weight


def _check_layer(name, w, kind, n, m, block, sparsity):
    out_f, in_f = w.shape
    if not w.is_floating_point():
        raise ValueError(f"{name}: weight dtype {w.dtype} cannot be pruned")
    if kind == "nm":
        if in_f % m:
            raise ValueError(f"{name}: pattern '{n}:{m}' needs in_features to be a multiple of {m}, got {in_f}")
        if abs(sparsity - (1 - n / m)) > 1e-6:
            raise ValueError(f"{name}: pattern '{n}:{m}' always gives sparsity {1 - n / m:g}, got sparsity={sparsity}")
    if kind == "block" and (out_f % block[0] or in_f % block[1]):
        raise ValueError(f"{name}: block {block[0]}x{block[1]} does not tile the weight {out_f}x{in_f}")


def _batches(calib_data):
    if calib_data is None:
        return []
    if isinstance(calib_data, (torch.Tensor, dict)):
        return [calib_data]
    return list(calib_data)


def _call(model, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _loss(output, batch, loss_fn):
    if loss_fn is not None:
        return loss_fn(output, batch)
    if getattr(output, "loss", None) is not None:
        return output.loss
    if isinstance(output, dict):
        output = next(v for v in output.values() if isinstance(v, torch.Tensor))
    elif isinstance(output, (tuple, list)):
        output = output[0]
    return output.float().pow(2).mean()


def _calibrate(model, layers, batches, need_norms, need_grads, loss_fn):
    """Input-feature norms (wanda) and summed weight gradients (gradient,
    taylor) per layer name. Leaves parameters, .grad and modes as they were."""
    sq = {name: torch.zeros(_weight_oi(mod).shape[1], dtype=torch.float64, device=mod.weight.device)
          for name, mod in layers.items()} if need_norms else {}
    grads = {name: torch.zeros_like(mod.weight, dtype=torch.float32) for name, mod in layers.items()}
    handles = []
    if need_norms:
        for name, mod in layers.items():
            def hook(module, args, name=name):
                x = args[0]
                if x.is_floating_point() and not torch.isfinite(x).all():
                    raise ValueError(f"{name}: calibration input holds NaN or inf (a non-finite "
                                     f"activation); cannot score the weights")
                if x.shape[-1] != sq[name].numel():
                    raise ValueError(f"{name}: calibration input has {x.shape[-1]} features, "
                                     f"the layer expects {sq[name].numel()}")
                sq[name] += x.detach().reshape(-1, x.shape[-1]).double().pow(2).sum(0)
            handles.append(mod.register_forward_pre_hook(hook))
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        for i, batch in enumerate(tqdm(batches, desc="calibrating", unit="batch", disable=len(batches) < 8)):
            _check_finite(batch, i)
            try:
                if not need_grads:
                    with torch.no_grad():
                        _call(model, batch)
                    continue
                weights = [mod.weight for mod in layers.values()]
                flags = [w.requires_grad for w in weights]
                try:
                    with torch.enable_grad():
                        for w in weights:
                            w.requires_grad_(True)
                        out = _call(model, batch)
                        gs = torch.autograd.grad(_loss(out, batch, loss_fn), weights, allow_unused=True)
                finally:
                    for w, f in zip(weights, flags):
                        w.requires_grad_(f)
                for name, g in zip(layers, gs):
                    if g is not None:
                        if not torch.isfinite(g).all():
                            raise ValueError(f"{name}: the gradient of calibration batch {i} holds NaN or "
                                             f"inf; cannot score the weights")
                        grads[name] += g.float()
            except ValueError:
                raise
            except Exception as e:  # the model's own error, e.g. a batch of the wrong shape
                raise ValueError(f"calibration batch {i} could not be run through the model: {e}") from e
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.train(t)
    norms = {name: s.sqrt().float() for name, s in sq.items()}
    return norms, grads


def _check_finite(batch, i):
    for leaf in pytree.tree_leaves(batch):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and not torch.isfinite(leaf).all():
            raise ValueError(f"calib_data: batch {i} holds NaN or inf; calibration needs finite inputs")


def _tie_groups(layers):
    """{first name: [names sharing that weight]} in walk order."""
    first, groups = {}, {}
    for name, mod in layers.items():
        key = id(mod.weight)
        first.setdefault(key, name)
        groups.setdefault(first[key], []).append(name)
    return groups


def _merge_ties(groups, norms, grads):
    """One calibration signal per shared weight. Wanda: the input norms of
    every module using it, combined; gradients: autograd already returned the
    weight's whole gradient for each name, so the first one is it."""
    for lead, names in groups.items():
        if len(names) > 1 and lead in norms:
            norms[lead] = torch.stack([norms[n] for n in names]).pow(2).sum(0).sqrt()


def _score(mod, name, score, norms, grads):
    """(score tensor [out, in], the score's name for the report). A layer the
    calibration never reached (no input, or no gradient) falls back to
    magnitude, with a warning, rather than being pruned at random."""
    w = _weight_oi(mod).detach().float()
    signal = norms.get(name) if score == "wanda" else grads.get(name)
    if score != "magnitude" and (signal is None or not signal.any()):
        log.warning("%s: no calibration signal for score=%s; using magnitude", name, score)
        return w.abs(), "magnitude (no calibration signal)"
    return _data_score(mod, w, name, score, norms, grads), score


def _data_score(mod, w, name, score, norms, grads):
    if score == "magnitude":
        return w.abs()
    g = grads[name].t() if is_conv1d(mod) else grads[name]
    if score == "gradient":
        a = g.abs()
        return a / a.sum().clamp_min(1e-30)
    if score == "taylor":
        return (w * g).abs()
    return w.abs() * norms[name][None, :]


def _lowest_mask(s, k):
    """Bool mask (True = kept) of s with the k lowest entries (ties by position)
    dropped; at least one entry is always kept."""
    k = min(k, s.numel() - 1)
    mask = torch.ones(s.numel(), dtype=torch.bool, device=s.device)
    if k > 0:
        mask[torch.argsort(s.flatten(), stable=True)[:k]] = False
    return mask.view(s.shape)


def _mask(s, kind, n, m, block, sparsity, scope):
    out_f, in_f = s.shape
    if kind == "nm":
        groups = s.reshape(out_f, in_f // m, m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(2, groups.topk(n, dim=2).indices, True)
        return keep.view(out_f, in_f)
    if kind == "block":
        bh, bw = block
        bs = s.reshape(out_f // bh, bh, in_f // bw, bw).sum((1, 3))
        keep = _lowest_mask(bs, round(sparsity * bs.numel()))
        return keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    if scope == "row":
        k = min(round(sparsity * in_f), in_f - 1)  # a row keeps at least one weight
        order = torch.argsort(s, dim=1, stable=True)[:, :k]
        return torch.ones_like(s, dtype=torch.bool).scatter_(1, order, False)
    return _lowest_mask(s, round(sparsity * s.numel()))


def prune(model: nn.Module, sparsity: float = 0.5, pattern: str = "2:4", score: str = "magnitude",
          calib_data=None, target_modules=None, exclude_modules=("lm_head",), block=(16, 16),
          scope: str = "layer", loss_fn=None, masked_training: bool = True) -> PruneReport:
    """Prune the weights of matching nn.Linear / Conv1D layers in place.

    calib_data: a tensor, a dict of keyword arguments, or an iterable of
        batches (each a tensor, a tuple of positional arguments or a dict),
        needed by score="gradient", "taylor" and "wanda".
    scope: "layer", "row" or "global" comparison for pattern="unstructured".
    masked_training: keep the pruned weights at zero during later training
        (gradient hooks plus a global optimizer step hook); see
        PruneReport.remove_masks().
    Everything is checked, and every score computed, before any weight changes:
    on an error the model is left as it was.
    """
    kind, n, m = parse_pattern(pattern)
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if kind == "block" and (len(block) != 2 or min(block) < 1):
        raise ValueError(f"block must be (rows, cols) of positive ints, got {block!r}")
    layers = {name: child for name, child, reason in select_linears(model, target_modules, exclude_modules)
              if reason is None}
    for name, child in layers.items():
        _check_layer(name, _weight_oi(child), kind, n, m, block, sparsity)
    groups = _tie_groups(layers)
    batches = _batches(calib_data)
    if score != "magnitude" and not batches:
        raise ValueError(f"score={score!r} needs calib_data (batches of model inputs)")
    norms, grads = {}, {}
    if score != "magnitude" and layers:
        norms, grads = _calibrate(model, layers, batches, score == "wanda", score in ("gradient", "taylor"),
                                  loss_fn)
        _merge_ties(groups, norms, grads)
    scored = {name: _score(layers[name], name, score, norms, grads) for name in groups}
    scores = {name: s for name, (s, _) in scored.items()}
    masks = {}
    if kind == "unstructured" and scope == "global" and scores:
        flat = torch.cat([(s / s.sum().clamp_min(1e-30)).flatten() for s in scores.values()])
        keep = _lowest_mask(flat, round(sparsity * flat.numel()))
        start = 0
        for name, s in scores.items():
            masks[name] = keep[start:start + s.numel()].view(s.shape).clone()
            if not masks[name].any():  # every layer keeps at least its best weight
                masks[name].view(-1)[s.argmax()] = True
            start += s.numel()
    else:
        masks = {name: _mask(s, kind, n, m, block, sparsity, scope) for name, s in scores.items()}
    for lead, names in groups.items():
        for name in names[1:]:
            masks[name] = masks[lead]
    report = PruneReport(masks={name: masks[name] for name in layers})
    label = f"block {block[0]}x{block[1]}" if kind == "block" else pattern
    lead_of = {name: lead for lead, names in groups.items() for name in names}
    with torch.no_grad():
        for name, mod in layers.items():
            keep = masks[name]
            w_mask = keep.t() if is_conv1d(mod) else keep
            lead = lead_of[name]
            if lead == name:  # where, not multiply: an inf weight that is pruned becomes 0, not NaN
                mod.weight.masked_fill_(~w_mask, 0)
            reached = 1 - keep.float().mean().item()
            out_f, in_f = keep.shape
            report.layers.append(PrunedLayer(name, out_f, in_f, label, scored[lead][1], reached,
                                             tied_to="" if lead == name else lead))
            report._modules.append(weakref.ref(mod))
            if masked_training:
                MaskHandle(mod.weight, w_mask, mod)
    log.info("pruned %d layers to %.1f%% zeros (%s, %s)", len(layers), 100 * report.sparsity, label, score)
    return report
