"""bench/summarize.py on a hand-made pytest-benchmark JSON: rows, ratios, files.
(Here rather than in bench/ so that `make test` runs it.)"""
import importlib.util
import json
import os

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "summarize.py")
if not os.path.exists(_PATH):
    pytest.skip("bench/ is not beside tests/ (tests copied without the source tree)", allow_module_level=True)
_spec = importlib.util.spec_from_file_location("summarize", _PATH)
summarize = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(summarize)


def bench(impl, m, median, iqr, baseline, calls=1, **extra):
    info = dict(op="linear", impl=impl, shape="64x64", dtype="float32", M=m, device="cpu", regime="hot",
                baseline=baseline, accuracy=40.0 if impl.startswith("peft_ext") else None, **extra)
    if calls != 1:
        info["calls"] = calls
    return {"group": "int8", "name": f"test[{impl}-{m}]", "fullname": f"bench_int8.py::test[{impl}-{m}]",
            "extra_info": info, "stats": {"median": median, "iqr": iqr, "rounds": 7}}


def doc(*benchmarks):
    return {"machine_info": {"peft_ext": {"cpu": "Test CPU", "isa_flags": {"avx2": True, "avx512f": False},
                                          "torch": "x", "threads": 2, "git_commit": "abc", "quick": True}},
            "benchmarks": list(benchmarks)}


def test_rows_ratio_spread_calls_and_bound():
    rows = summarize.rows_of(doc(
        bench("fp32_linear", 1, 4.0, 0.4, "fp32_linear"),
        bench("peft_ext_dynamic", 1, 8.0, 2.0, "fp32_linear", calls=4, bound_s=0.5, bound="memory"),
        bench("fp32_linear", 16, 10.0, 1.0, "fp32_linear"),
        bench("peft_ext_dynamic", 16, 5.0, 1.0, "missing_peer"),
    ))
    by = {(r["impl"], r["M"]): r for r in rows}
    ours = by[("peft_ext_dynamic", 1)]
    assert ours["median_s"] == pytest.approx(2.0)  # 8 s per round of 4 calls
    assert ours["spread"] == pytest.approx(0.25)  # IQR / median, independent of calls
    assert ours["ratio"] == pytest.approx(2.0)  # 4.0 / 2.0: ours is twice as fast
    assert ours["fraction_of_bound"] == pytest.approx(0.25)
    assert ours["bound"] == "memory" and ours["accuracy"] == 40.0
    assert by[("fp32_linear", 16)]["ratio"] == pytest.approx(1.0)
    assert by[("peft_ext_dynamic", 16)]["ratio"] is None  # no such baseline row


def test_missing_field_is_an_error():
    b = bench("fp32_linear", 1, 1.0, 0.1, "fp32_linear")
    del b["extra_info"]["baseline"]
    with pytest.raises(ValueError, match="baseline"):
        summarize.rows_of(doc(b))


def test_files(tmp_path):
    exact = bench("exact_peer", 16, 2.0, 0.2, "fp32_linear")
    exact["extra_info"]["accuracy"] = float("inf")
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps(doc(
        bench("fp32_linear", 1, 4.0, 0.4, "fp32_linear"), bench("peft_ext_dynamic", 1, 2.0, 0.2, "fp32_linear"),
        bench("fp32_linear", 16, 8.0, 0.4, "fp32_linear"), bench("peft_ext_dynamic", 16, 2.0, 0.2, "fp32_linear"),
        exact)))
    pytest.importorskip("matplotlib")
    assert summarize.main([str(raw), "--out", str(tmp_path)]) == 0
    def strict(name):
        raise ValueError(f"not JSON: {name}")

    out = json.loads((tmp_path / "int8_cpu.json").read_text(), parse_constant=strict)
    assert [r["accuracy"] for r in out["rows"] if r["impl"] == "exact_peer"] == ["inf"]
    assert set(out) == {"machine", "rows", "table"}
    assert out["machine"]["cpu"] == "Test CPU"
    assert {"op", "impl", "shape", "dtype", "M", "median_s", "spread", "ratio", "baseline", "accuracy"} <= set(
        out["rows"][0])
    md = (tmp_path / "int8_cpu.md").read_text()
    assert "**2.00 s (4.00x fp32_linear)**" in md
    # the ratio from alternating calls (harness.paired_ratio) is shown beside the separate one
    raw.write_text(json.dumps(doc(
        bench("fp32_linear", 1, 4.0, 0.4, "fp32_linear"),
        bench("peft_ext_dynamic", 1, 2.0, 0.2, "fp32_linear", paired_ratio=1.5))))
    assert summarize.main([str(raw), "--out", str(tmp_path), "--no-plot"]) == 0
    md = (tmp_path / "int8_cpu.md").read_text()
    assert "**2.00 s (2.00x fp32_linear, alternating calls 1.50x)**" in md
    assert (tmp_path / "int8_cpu.png").stat().st_size > 1000
