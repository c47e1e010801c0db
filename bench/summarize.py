"""pytest-benchmark JSON -> the one result schema, a Markdown table and a plot.

    python bench/summarize.py RAW.json [RAW2.json ...] [--out bench/results] [--no-md] [--no-plot]

For every (benchmark.group, device) found it writes, under --out:
  <concept>_<device>.json  {"machine": {...}, "rows": [...], "table": "<markdown>"}
  <concept>_<device>.md    the Markdown table (unless --no-md)
  <concept>_<device>.png   speed-up of each of ours against each peer vs M (unless --no-plot;
                           needs matplotlib)
A row: op, impl, shape, dtype, M, device, regime, median_s, spread (IQR / median), rounds,
baseline, ratio (baseline median / this median: above 1, this one is faster), accuracy
(SQNR dB against float64, None where it does not apply), and where the benchmark gave a
roofline floor bound_s: bound ("memory" or "compute") and fraction_of_bound
(bound_s / median_s); paired_ratio where the benchmark also timed the pair in alternating
calls (harness.paired_ratio). Other extra_info fields are kept as they are.
"""
import argparse
import json
import math
import os
import sys
from collections import OrderedDict, defaultdict

# Extra fields worth a word in the table cell, with their format.
SHOWN = (("overlap_efficiency", "efficiency {:.2f}"),
         ("efficiency_vs_side_by_side", "{:.2f} of side by side"), ("gbps", "{:.1f} GB/s"),
         ("overhead_per_batch_us", "+{:.0f} us per batch"),
         ("overhead_per_batch_us_alternating", "alternating calls +{:.0f} us"), ("tokens_per_s", "{:.0f} tokens/s"),
         ("peak_vs_naive", "peak {:.3f}x naive"), ("loss_rel_diff", "loss rel. diff {:.1e}"))
REQUIRED = ("op", "impl", "shape", "dtype", "M", "baseline", "accuracy")
# Rows that are the same case measured by different implementations.
CASE = ("device", "op", "regime", "shape", "dtype", "M")


def is_ours(impl):
    return str(impl).startswith("peft_ext")


def _finite(v):
    """JSON has no inf: an exact result (infinite SQNR) is written as the string "inf"."""
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


def rows_of(data):
    """Rows (one per benchmark) from one pytest-benchmark JSON document."""
    rows = []
    for b in data["benchmarks"]:
        extra = dict(b.get("extra_info") or {})
        missing = [k for k in REQUIRED if k not in extra]
        if missing:
            raise ValueError(f"{b['fullname']}: extra_info lacks {missing} (every benchmark must set "
                             f"{', '.join(REQUIRED)})")
        calls = extra.pop("calls", 1) or 1
        stats = b["stats"]
        median = stats["median"] / calls
        row = OrderedDict(concept=b["group"], op=extra.pop("op"), impl=extra.pop("impl"),
                          shape=extra.pop("shape"), dtype=extra.pop("dtype"), M=extra.pop("M"),
                          device=extra.pop("device", "cpu"), regime=extra.pop("regime", None),
                          median_s=median, spread=stats["iqr"] / stats["median"] if stats["median"] else None,
                          rounds=stats["rounds"], baseline=extra.pop("baseline"), ratio=None,
                          accuracy=_finite(extra.pop("accuracy")))
        bound = extra.pop("bound_s", None)
        if bound is not None:
            row["bound_s"] = bound
            row["bound"] = extra.pop("bound", None)
            row["fraction_of_bound"] = bound / median
        if calls != 1:
            row["calls_per_round"] = calls
        row.update({k: _finite(v) for k, v in extra.items()})
        rows.append(row)
    by_case = {(tuple(r[k] for k in CASE), r["impl"]): r for r in rows}
    for r in rows:
        base = by_case.get((tuple(r[k] for k in CASE), r["baseline"]))
        if base is not None:
            r["ratio"] = base["median_s"] / r["median_s"]
    return rows


def machine_of(data):
    info = data.get("machine_info", {})
    machine = dict(info.get("peft_ext") or {})
    if not machine:  # a JSON written without bench/conftest.py
        machine = {"cpu": info.get("cpu", {}).get("brand_raw"), "node": info.get("node")}
    return machine


def _fmt_s(s):
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def _fmt_m(m):
    return "-" if m is None else str(m)


def sections(rows):
    """Rows grouped by (op, regime, dtype), in the order the benchmarks ran."""
    out = OrderedDict()
    for r in rows:
        out.setdefault((r["op"], r["regime"], r["dtype"]), []).append(r)
    return out


def table(machine, rows):
    lines = [header(machine), "",
             "Cells: median (ratio = baseline median / this median, against the named baseline; "
             "above 1 is faster; 'alternating calls': the same ratio from calls that alternate "
             "between the two, robust to the machine's speed drifting between tests). Bound: the row's roofline floor over its median "
             "(memory bound: measured read bandwidth; compute bound: measured peak), as a percentage.", ""]
    for (op, regime, dtype), rs in sections(rows).items():
        impls = list(OrderedDict.fromkeys(r["impl"] for r in rs))
        cases = list(OrderedDict.fromkeys((r["shape"], r["M"]) for r in rs))
        cell = {(r["shape"], r["M"], r["impl"]): r for r in rs}
        title = f"### {op}" + (f", {regime}" if regime else "") + (f", {dtype}" if dtype else "")
        lines += [title, "", "| shape | M | " + " | ".join(impls) + " |", "|---|---|" + "---|" * len(impls)]
        for shape, m in cases:
            cells = []
            for impl in impls:
                r = cell.get((shape, m, impl))
                if r is None:
                    cells.append("-")
                    continue
                text = _fmt_s(r["median_s"])
                if r["ratio"] is not None and r["baseline"] != impl:
                    paired = r.get("paired_ratio")
                    paired = f", alternating calls {paired:.2f}x" if isinstance(paired, (int, float)) else ""
                    text += f" ({r['ratio']:.2f}x {r['baseline']}{paired})"
                for key, fmt in SHOWN:
                    if isinstance(r.get(key), (int, float)):
                        text += ", " + fmt.format(r[key])
                if r.get("fraction_of_bound") is not None:
                    text += f", {100 * r['fraction_of_bound']:.0f}% of {r['bound']} bound"
                cells.append(f"**{text}**" if is_ours(impl) else text)
            lines.append(f"| {shape} | {_fmt_m(m)} | " + " | ".join(cells) + " |")
        if any(r["accuracy"] is not None for r in rs):
            lines.append("")
            lines.append("SQNR dB against float64 (" + ", ".join(
                f"{impl} {_fmt_acc([r['accuracy'] for r in rs if r['impl'] == impl])}" for impl in impls) + ")")
        lines.append("")
    return "\n".join(lines)


def _fmt_acc(values):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    nums = [float(v) for v in values]
    lo, hi = min(nums), max(nums)
    return f"{lo:.1f}" if hi == lo or hi - lo < 0.05 else f"{lo:.1f} to {hi:.1f}"


def header(machine):
    isa = ", ".join(f for f, on in (machine.get("isa_flags") or {}).items() if on) or "?"
    parts = [f"CPU: {machine.get('cpu')} ({isa}), peft_ext ISA {machine.get('peft_ext_cpu_isa')}, "
             f"{machine.get('threads')} threads",
             f"GPU: {machine.get('gpu') or 'none'}",
             f"torch {machine.get('torch')}, commit {str(machine.get('git_commit'))[:10]}, {machine.get('date')}"
             + (", QUICK (smoke-test shapes, figures not meaningful)" if machine.get("quick") else "")]
    roof = []
    if "cpu_read_bytes_per_s" in machine:
        roof.append(f"CPU read {machine['cpu_read_bytes_per_s'] / 1e9:.1f} GB/s, fp32 "
                    f"{machine['cpu_fp32_flops'] / 1e9:.3g} GFLOP/s, int8 {machine['cpu_int8_ops'] / 1e9:.3g} GOP/s "
                    f"(best of {', '.join(machine.get('cpu_int8_ops_all', {}))}: {machine.get('cpu_int8_ops_from')})")
    if "cuda_copy_bytes_per_s" in machine:
        roof.append(f"GPU copy {machine['cuda_copy_bytes_per_s'] / 1e9:.0f} GB/s, bf16 "
                    f"{machine['cuda_bf16_flops'] / 1e12:.0f} TFLOP/s, int8 (_int_mm) "
                    f"{machine['cuda_int8_ops'] / 1e12:.0f} TOP/s")
    if roof:
        parts.append("Roofline (measured): " + "; ".join(roof))
    return "  \n".join(parts)


def _minor_label(v, _):
    """Label 2x and 5x (times a power of ten) on a log axis, not every minor tick."""
    if v <= 0:
        return ""
    mantissa = v / 10 ** math.floor(math.log10(v) + 1e-9)
    return f"{v:g}x" if round(mantissa, 6) in (2, 5) else ""


def plot(rows, path, title):
    """One panel per (op, regime, dtype, shape, ours impl): speed-up against each peer vs M."""
    # Lazy: matplotlib is needed only for the PNG, and the backend must be set first.
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: PLC0415

    panels = OrderedDict()
    for (op, regime, dtype), rs in sections(rows).items():
        ours_impls = list(OrderedDict.fromkeys(r["impl"] for r in rs if is_ours(r["impl"])))
        if all(r["M"] is None for r in rs):  # no M axis (prefetch): one panel, the cases along x
            for ours in ours_impls:
                panels[(op, regime, dtype, None, ours)] = rs
            continue
        for shape in OrderedDict.fromkeys(r["shape"] for r in rs):
            for ours in ours_impls:
                panels[(op, regime, dtype, shape, ours)] = [r for r in rs if r["shape"] == shape]
    # A panel needs a peer to compare against (weight streaming has none).
    panels = OrderedDict((k, rs) for k, rs in panels.items() if any(not is_ours(r["impl"]) for r in rs))
    if not panels:
        return False
    cols = min(4, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, ((op, regime, dtype, shape, ours), rs) in zip(axes.flat, panels.items()):
        numeric = shape is not None

        def x_of(r):
            return r["M"] if numeric else r["shape"]

        ms = list(OrderedDict.fromkeys(x_of(r) for r in rs))
        med = {(x_of(r), r["impl"]): r["median_s"] for r in rs}
        for peer in OrderedDict.fromkeys(r["impl"] for r in rs if not is_ours(r["impl"])):
            pts = [(m, med[(m, peer)] / med[(m, ours)]) for m in ms if (m, peer) in med and (m, ours) in med]
            if not pts:
                continue
            xs = [p[0] for p in pts] if numeric else [ms.index(p[0]) for p in pts]
            ax.plot(xs, [p[1] for p in pts], marker="o", label=f"vs {peer}")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        if numeric and len(ms) > 1 and min(ms) > 0:
            ax.set_xscale("log", base=2)
        if numeric:
            ax.set_xticks(ms)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        else:
            ax.set_xticks(range(len(ms)))
            ax.set_xticklabels([str(m) for m in ms], fontsize=7)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(FuncFormatter(_minor_label))
        ax.set_xlabel("M" if numeric else "case")
        ax.set_ylabel(f"{ours} speed-up")
        ax.set_title(" ".join(str(p) for p in (op, regime, dtype, shape) if p), fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json files")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--no-md", action="store_true", help="no .md file (the table stays in the JSON)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    groups = defaultdict(list)
    machine = {}
    for path in args.json:
        with open(path) as f:
            data = json.load(f)
        machine = machine_of(data) or machine
        for r in rows_of(data):
            groups[(r.pop("concept"), r["device"])].append(r)
    if not groups:
        # Every benchmark skipped (for example the CUDA ones without a GPU): nothing to write.
        print(f"no benchmarks ran in {args.json}", file=sys.stderr)
        return 0
    os.makedirs(args.out, exist_ok=True)
    for (concept, device), rows in groups.items():
        name = os.path.join(args.out, f"{concept}_{device}")
        md = f"## {concept} ({device})\n\n" + table(machine, rows)
        with open(name + ".json", "w") as f:
            json.dump({"machine": machine, "rows": rows, "table": md}, f, indent=1)
        written = [name + ".json"]
        if not args.no_md:
            with open(name + ".md", "w") as f:
                f.write(md + "\n")
            written.append(name + ".md")
        if not args.no_plot:
            try:
                where = machine.get("cpu") if device == "cpu" else machine.get("gpu")
                if plot(rows, name + ".png", f"{concept} ({device}): {where}"):
                    written.append(name + ".png")
            except ImportError:
                print("matplotlib is not installed: no plot", file=sys.stderr)
        print(md)
        print("wrote " + ", ".join(written) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
