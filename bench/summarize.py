"""Print a table of medians and speed-ups from a pytest-benchmark JSON file.

    python bench/summarize.py bench/results/int8_cpu.json [--ours peft_ext_dynamic ...]
"""
import argparse
import json
import re
from collections import defaultdict


def load(path):
    with open(path) as f:
        data = json.load(f)
    groups = defaultdict(dict)
    for b in data["benchmarks"]:
        impl = re.search(r"\[(.*)\]", b["name"]).group(1).split("-")[0]
        groups[b["group"]][impl] = (b["stats"]["median"], b.get("extra_info", {}).get("sqnr_db"))
    return data, groups


def table(groups, ours):
    lines = []
    for group in sorted(groups, key=lambda g: [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", g)]):
        medians = {impl: med for impl, (med, _) in groups[group].items()}
        sqnr = {impl: db for impl, (_, db) in groups[group].items()}
        show_sqnr = any(db is not None for db in sqnr.values())
        lines.append(f"## {group}")
        lines.append("| impl | median ms | " + ("SQNR dB | " if show_sqnr else "")
                     + " | ".join(f"{o} speed-up" for o in ours if o in medians) + " |")
        lines.append("|---|---|" + ("---|" if show_sqnr else "") + "---|" * sum(o in medians for o in ours))
        for impl, med in sorted(medians.items(), key=lambda kv: kv[1]):
            ratios = " | ".join(f"{med / medians[o]:.2f}x" for o in ours if o in medians)
            db = (f"{sqnr[impl]:.1f} | " if sqnr[impl] is not None else "- | ") if show_sqnr else ""
            lines.append(f"| {impl} | {med * 1e3:.3f} | {db}{ratios} |")
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("json")
    parser.add_argument("--ours", nargs="*", default=None)
    args = parser.parse_args()
    data, groups = load(args.json)
    ours = args.ours or sorted({i for g in groups.values() for i in g if i.startswith("peft_ext")})
    info = data["machine_info"]
    print(f"{info.get('cpu', {}).get('brand_raw', '')}, torch {info.get('torch')}, "
          f"{info.get('torch_threads')} threads, commit {str(info.get('git_commit'))[:10]}, {info.get('date')}")
    print("speed-up = peer median / ours median (above 1: ours is faster)\n")
    print(table(groups, ours))


if __name__ == "__main__":
    main()
