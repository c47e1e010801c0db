"""Data-parallel training under torchrun (2 processes, gloo, CPU).

The checks run inside tests/dist_worker.py on every rank (it raises on the
first broken invariant, so torchrun fails); here we launch it and read what
each rank recorded. Two launches run side by side to bound the file's time:
every training scenario in one, and a run where rank 1 raises (the other
rank must be ended by torchrun, not hang).
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from peft_ext import distributed as pdist

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "dist_worker.py"
TIMEOUT_S = 150
SCENARIOS = ["ddp", "default_ddp", "norm", "local_sgd", "fsdp2", "lora", "fsdp2_lora", "offload", "mismatch"]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out_dir, scenarios):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "0",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(WORKER), str(out_dir),
           *scenarios]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc):
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {TIMEOUT_S} s:\n{out[-4000:]}")
    return proc.returncode, out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    ok_dir, fail_dir = tmp_path_factory.mktemp("dist_ok"), tmp_path_factory.mktemp("dist_fail")
    procs = {"ok": _launch(ok_dir, SCENARIOS), "fail": _launch(fail_dir, ["fail"])}
    done = {name: _wait(p) for name, p in procs.items()}
    rc, out = done["ok"]
    assert rc == 0, f"torchrun exited with {rc}:\n{out[-6000:]}"
    ranks = [json.loads((ok_dir / f"rank{r}.json").read_text()) for r in range(2)]
    return {"ranks": ranks, "fail": done["fail"]}


def test_ddp_steps_keep_ranks_identical_and_frozen_parts_intact(runs):
    for res in runs["ranks"]:
        assert res["world_size"] == 2
        assert res["ddp"]["steps"] == 12  # 96 samples / 2 ranks / batch 8, 2 epochs: every step was checked
        assert res["plan"]["frozen"] == ["fc1.weight", "fc1.weight_scale", "fc2.values", "fc2.indices"]
        assert res["plan"]["mutable"] == []


def test_prepare_ddp_never_broadcasts_frozen_buffers(runs):
    res = runs["ranks"][0]
    assert res["ddp"]["broadcast_bytes"] == 0
    base = res["default_ddp"]
    # Plain DDP re-sends every buffer before each forward: what prepare_ddp saves.
    assert base["broadcast_bytes"] == base["steps"] * base["buffer_bytes"] == base["steps"] * res["plan"]["frozen_bytes"]
    # The gradients are all-reduced either way: same bytes per step.
    assert res["ddp"]["allreduce_bytes"] / res["ddp"]["steps"] == base["allreduce_bytes"] / base["steps"]


def test_norm_statistics_still_synced(runs):
    norm = runs["ranks"][0]["norm"]
    assert norm["mutable"] == ["norm.running_mean", "norm.running_var", "norm.num_batches_tracked"]
    assert norm["broadcasts"] == norm["steps"]
    assert norm["broadcast_bytes"] == norm["steps"] * norm["mutable_bytes"]


def test_local_sgd_agrees_exactly_at_averaging_points(runs):
    for res in runs["ranks"]:
        steps = res["local_sgd"]
        assert [s["averaged"] for s in steps] == [pdist.averaged_after(i, 3, 2) for i in range(9)]
        assert any(not s["same"] for s in steps) and all(s["same"] for s in steps if s["averaged"])


def test_fsdp2_step_on_gloo_cpu(runs):
    for res in runs["ranks"]:
        fsdp = res["fsdp2"]
        assert fsdp["local_shard"] == [24]  # fc1.bias (48) sharded in two
        assert fsdp["buffer_shapes"]["fc1.weight"] == [48, 32]  # int8 weight whole on every rank


def test_lora_under_ddp(runs):
    lora = runs["ranks"][0]["lora"]
    if isinstance(lora, str):
        pytest.skip(lora)
    assert lora["frozen_checked"] >= 6 and lora["trainable"] > 0


def test_fsdp2_lora_on_int8_and_sparse_base_matches_single_process(runs):
    res = runs["ranks"][0]["fsdp2_lora"]
    if isinstance(res, str):
        pytest.skip(res)
    assert res["base_types"] == ["Int8Linear", "SparseLinear", "Linear"]
    assert res["max_diff_vs_single_process"] < 1e-4 and res["frozen_checked"] >= 6


def test_offloaded_base_trains(runs):
    assert runs["ranks"][0]["offload"]["streamed_bytes_per_forward"] > 0


def test_prefetcher_stats_per_epoch(runs):
    epochs = runs["ranks"][0]["ddp"]["prefetch_epochs"]
    assert [e["batches"] for e in epochs] == [6, 6]
    assert all(e["bytes"] > 0 and 0 <= e["overlap"] <= 1 for e in epochs)


def test_mismatched_frozen_buffers_refused(runs):
    for res in runs["ranks"]:
        assert "fc1.weight" in res["mismatch"]


def test_failing_rank_ends_the_run(runs):
    rc, out = runs["fail"]
    assert rc != 0
    assert "rank 1 fails on purpose" in out


def test_prepare_ddp_needs_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        pdist.prepare_ddp(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="broadcast_buffers"):
        pdist.prepare_ddp(nn.Linear(2, 2), broadcast_buffers=True)


def test_fingerprint_sees_one_changed_byte_and_a_swap():
    w = torch.randint(-127, 128, (37, 13), dtype=torch.int8)
    base = pdist._fingerprint(w)
    one = w.clone()
    one[5, 7] = one[5, 7] + 1 if one[5, 7] < 127 else one[5, 7] - 1
    swapped = w.clone()
    swapped[0, 0], swapped[0, 1] = w[0, 1].item(), w[0, 0].item()
    assert torch.equal(base, pdist._fingerprint(w.clone()))
    assert not torch.equal(base, pdist._fingerprint(one))
    if w[0, 0] != w[0, 1]:
        assert not torch.equal(base, pdist._fingerprint(swapped))
    assert not torch.equal(pdist._fingerprint(torch.zeros(4)), pdist._fingerprint(torch.full((4,), -0.0)))


def test_mutable_and_frozen_split():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model.register_buffer("table", torch.ones(3))
    model.register_buffer("step", torch.zeros(()))
    model[2].weight.requires_grad_(False)
    mutable = pdist.mutable_buffer_names(model, ["step"])
    assert mutable == ["1.running_mean", "1.running_var", "1.num_batches_tracked", "step"]
    assert [n for n, _ in pdist.frozen_tensors(model, mutable)] == ["table", "2.weight"]
    with pytest.raises(ValueError, match="mutable_buffers"):
        pdist.mutable_buffer_names(model, ["nope"])


def test_local_sgd_arguments_and_schedule():
    with pytest.raises(ValueError, match="period"):
        pdist.local_sgd(None, None, period=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        pdist.local_sgd(None, None, period=2, warmup_steps=-1)
    assert [s for s in range(10) if pdist.averaged_after(s, 3, 2)] == [2, 5, 8]
