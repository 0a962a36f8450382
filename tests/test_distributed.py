"""torchrun on torch.distributed (gloo): two CPU processes give what one gives (docs/distributed.md).

Every run here is a real ``torchrun --standalone --nproc-per-node 2`` in fresh processes. What must agree with one
process: the output's tensors, byte for byte (each rank holds whole batches as one process makes them, and sums
accumulate in float64, so the order of the ranks' sums does not show once rounded to float32); the perplexity;
the report's rows, in the same order. Rank 0 alone writes; no scratch is left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparsify.distributed import SINGLE, World
from tests import zoo
from tests.test_guarantees import _weights

pytestmark = pytest.mark.slow  # torchrun: two processes per test

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--samples", "8", "--seq-len", "64", "--batch-size", "2", "--json"]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _one(*args: object) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sparsify", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300, check=False)


def _two(*args: object, module: str = "sparsify") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", module]
    return subprocess.run([*cmd, *map(str, args)], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def _both(tmp_path: Path, *args: object) -> tuple[Path, Path, dict, dict]:
    """The same command in one process and in two; both outputs and both reports (``--json`` on stdout)."""
    one, two = tmp_path / "one", tmp_path / "two"
    a = _one(*args, "-o", one, *SMALL)
    assert a.returncode == 0, a.stderr
    b = _two(*args, "-o", two, *SMALL)
    assert b.returncode == 0, b.stderr
    assert _errors(b.stderr) == []
    assert b.stdout.count('"run_id"') == 1  # rank 0 alone reports
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # the other rank's scratch is gone
    return one, two, json.loads(a.stdout), json.loads(b.stdout)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _same_rows(r1: dict, r2: dict) -> None:
    """The same rows in the same order; output errors measured on the same windows (rank 0 holds the first)."""
    rows1, rows2 = r1["layers"], r2["layers"]
    assert [(m["name"], m.get("status")) for m in rows1] == [(m["name"], m.get("status")) for m in rows2]
    assert rows1 or (r1["notes"] == r2["notes"] and "removed layers" in str(r1["notes"]))  # layer scores: in notes
    for m1, m2 in zip(rows1, rows2, strict=True):
        if m1.get("rel_error") is not None:
            assert m2["rel_error"] == pytest.approx(m1["rel_error"], rel=1e-3, abs=1e-7)


def _same_perplexity(r1: dict, r2: dict) -> None:
    assert r1["eval"]["before"] == r2["eval"]["before"] and r1["eval"]["after"] == r2["eval"]["after"]


# ------------------------------------------------------------------------------------------------ the world


def test_a_world_of_one_is_the_whole_run_and_shards_partition_the_windows():
    assert SINGLE.shard(7) == slice(0, 7) and SINGLE.leader and not SINGLE.active
    t = torch.arange(5.0)
    assert SINGLE.all_reduce_(t, "max") is t and t.tolist() == [0, 1, 2, 3, 4]
    assert SINGLE.gather_objects("x") == ["x"]
    for size in (1, 2, 3, 4):
        for n in (4, 5, 8, 9, 13):
            parts = [list(range(n))[World(rank, size).shard(n)] for rank in range(size)]
            assert [i for p in parts for i in p] == list(range(n))  # contiguous, in order: rank 0 holds the first
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


# --------------------------------------------------------------------------------------- one equals two


@pytest.mark.parametrize(
    ("args", "written"),
    [
        # statistics summed over the ranks, each Linear solved on one rank and broadcast
        (["prune", "--method", "sparsegpt", "--sparsity", "0.5"], "proj.weight"),
        # GPTQ solves spread too: each quantized Linear broadcast whole from its solver
        (["quantize", "--scheme", "w4a16", "--method", "gptq", "--group-size", "16"], "weight_packed"),
        # co-activation counts and the analytic router's sums all-reduced; token samples gathered
        (["moe-convert", "--experts", "4", "--top-k", "2", "--split", "coactivation", "--router", "analytic"],
         ".experts."),
        # each layer's score a mean over every rank's tokens: the same layer removed
        (["prune", "--structured", "layers", "--remove", "1"], "layers.0.mlp"),
    ],
    ids=["sparsegpt", "gptq", "moe", "layers"],
)  # fmt: skip
def test_two_ranks_write_what_one_process_writes(model_dir, calib_file, tmp_path, args, written):
    command, *flags = args
    one, two, r1, r2 = _both(tmp_path, command, model_dir("llama"), *flags, "--calib", calib_file)
    a, b = _tensors(one), _tensors(two)
    assert a.keys() == b.keys() and any(written in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same bytes
    _same_rows(r1, r2)
    _same_perplexity(r1, r2)


def test_two_ranks_heal_with_averaged_gradients(model_dir, calib_file, tmp_path):
    """Heal under torchrun: each rank fits its own windows, gradients and losses averaged over the ranks, so both
    take the same steps. Not the same windows per step as one process: the same constraints and a close result."""
    _, two, r1, r2 = _both(
        tmp_path, "prune", model_dir("llama"), "--method", "wanda", "--pattern", "2:4", "--heal", "--heal-steps",
        "20", "--heal-precision", "fp32", "--calib", calib_file,
    )  # fmt: skip
    b = _tensors(two)
    for k in (k for k in b if k.endswith("proj.weight")):
        assert ((b[k].reshape(-1, 4) != 0).sum(1) <= 2).all(), k  # 2:4 kept by the healed layers
    healed = [m for m in r2["layers"] if m["kind"] == "heal"]
    assert healed and all(m["loss_after"] < m["loss_before"] for m in healed)
    ones = [m for m in r1["layers"] if m["kind"] == "heal"]
    assert healed[0]["loss_before"] == pytest.approx(ones[0]["loss_before"], rel=0.05)  # the same layer, windows
    assert abs(r2["eval"]["after"] / r1["eval"]["after"] - 1) < 0.05


def test_two_ranks_distill_with_averaged_gradients(model_dir, calib_file, tmp_path):
    """Distillation under torchrun: each rank holds the dense model's last hidden states of its own windows and
    trains on them, gradients averaged; the KL before training is the one process's (the same windows in the same
    groups), and the result is close to it."""
    _, two, r1, r2 = _both(
        tmp_path, "prune", model_dir("llama"), "--method", "wanda", "--pattern", "2:4", "--distill",
        "--distill-tokens", "512", "--distill-precision", "fp32", "--calib", calib_file,
    )  # fmt: skip
    b = _tensors(two)
    for k in (k for k in b if k.endswith("proj.weight")):
        assert ((b[k].reshape(-1, 4) != 0).sum(1) <= 2).all(), k
    (one,) = [m for m in r1["layers"] if m["kind"] == "distill"]
    (both,) = [m for m in r2["layers"] if m["kind"] == "distill"]
    assert both["loss_before"] == pytest.approx(one["loss_before"], rel=1e-4)
    assert both["loss_after"] < both["loss_before"] and both["tokens"] == one["tokens"]
    assert abs(r2["eval"]["after"] / r1["eval"]["after"] - 1) < 0.05


# ------------------------------------------------------------------------------------------ bad input, death


def test_what_cannot_run_data_parallel_is_refused_before_work(model_dir, calib_file, tmp_path):
    out = tmp_path / "out"
    cases = [
        (["prune", model_dir("llama"), "--method", "wanda", "--sparsity", "0.5", "--samples", "1"], "2 ranks for 1 calibration batch"),
        (["prune", model_dir("llama"), "--method", "wanda", "--sparsity", "0.5", "--device", "cuda"], "cuda"),
    ]  # fmt: skip
    for args, fragment in cases:
        r = _two(*args, "--calib", calib_file, "-o", out, "--seq-len", "64")
        assert r.returncode != 0
        errors = _errors(r.stderr)
        assert errors and fragment in errors[0], r.stderr
        assert "[rank0]: Traceback" not in r.stderr and "[rank1]: Traceback" not in r.stderr  # (torchrun's own shows)
        assert list(tmp_path.iterdir()) == []


def test_ranks_that_disagree_on_the_input_are_refused(tmp_path):
    script = tmp_path / "same.py"
    script.write_text(
        "from sparsify.distributed import from_env, shutdown\n"
        "from sparsify.errors import SparsifyError\n"
        "w = from_env('cpu')\n"
        "try:\n"
        "    w.same('model', {'weights': 'abc'})\n"
        "    w.same('recipe', {'sparsity': 0.5 + w.rank})\n"
        "except SparsifyError as e:\n"
        f"    open({str(tmp_path)!r} + f'/rank{{w.rank}}.txt', 'w').write(str(e))\n"
        "shutdown(w)\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    said = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]  # each rank refused
    assert all("rank(s) [1] have another recipe than rank 0" in line for line in said)


def test_collectives_take_any_layout(tmp_path):
    """What the layer loop sends: a module whose tensors are views (a transposed weight, a bool mask) arrives
    whole; sums land in the tensor reduced, contiguous or not; gathers of uneven parts come back in rank order."""
    script = tmp_path / "wire.py"
    script.write_text(
        "import torch\n"
        "from torch import nn\n"
        "from sparsify.distributed import from_env, shutdown\n"
        "w = from_env('cpu')\n"
        "m = nn.Module()\n"
        "m.weight = nn.Parameter(torch.full((6, 4), float(w.rank + 1)).t())  # non-contiguous (4, 6)\n"
        "m.register_buffer('mask', torch.arange(12).reshape(3, 4).t() % (2 + w.rank) == 0)\n"
        "w.broadcast_module_(m, src=0)\n"
        "s = torch.arange(12.0).reshape(3, 4).t() * (w.rank + 1)  # non-contiguous (4, 3)\n"
        "w.all_reduce_(s)\n"
        "g = w.all_gather_cat(torch.full((w.rank + 1, 2), float(w.rank)))\n"
        f"torch.save({{'weight': m.weight.data.clone(), 'mask': m.mask.clone(), 'sum': s, 'gathered': g}},"
        f" {str(tmp_path)!r} + f'/rank{{w.rank}}.pt')\n"
        "shutdown(w)\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(got["weight"], torch.ones(4, 6))  # rank 0's
        assert torch.equal(got["mask"], torch.arange(12).reshape(3, 4).t() % 2 == 0)
        assert torch.equal(got["sum"], torch.arange(12.0).reshape(3, 4).t() * 3)
        assert torch.equal(got["gathered"], torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))


def test_a_run_killed_on_both_ranks_resumes_to_the_same_bytes(calib_file, tmp_path):
    model = zoo.save("llama", tmp_path / "llama4", layers=4)
    args = ["prune", model, "--method", "sparsegpt", "--sparsity", "0.5", "--calib", calib_file, *SMALL, "--no-eval"]
    whole = _one(*args, "-o", tmp_path / "whole")  # = two ranks' bytes (test_two_ranks_write_what_one_process_writes)
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "out"
    killed = _two("kill@2", "--", *args, "-o", out, module="tests.faults")
    assert killed.returncode != 0 and not out.exists()
    resumed = _two(*args, "-o", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at layer 2 of 4" in resumed.stdout
    assert _weights(out) == _weights(tmp_path / "whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama4", "out", "whole"]
    # Killed again, then replaced by one process: the other rank's kept scratch goes once OUT is in place.
    assert _two("kill@2", "--", *args, "-o", out, "--overwrite", module="tests.faults").returncode != 0
    assert any(p.name.startswith("..out.rank1") for p in tmp_path.iterdir())
    single = _one(*args, "-o", out, "--overwrite")
    assert single.returncode == 0, single.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama4", "out", "whole"]
