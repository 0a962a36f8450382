"""MODEL as a Hugging Face Hub repo id, offline against a pre-filled cache (the layout huggingface_hub writes)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub_cache(model_dir, tmp_path_factory) -> Path:
    """``models--tiny-org--tiny-llama`` with refs/main → SHA and snapshot files symlinked into blobs."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / "models--tiny-org--tiny-llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    snapshot, blobs = repo / "snapshots" / SHA, repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in model_dir("llama").iterdir():
        data = f.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    return cache


def _sparsify(cache: Path, *args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "sparsify.cli", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_a_repo_id_is_read_from_the_cache_offline(hub_cache, tmp_path):
    before = {p: p.read_bytes() for p in hub_cache.rglob("*") if p.is_file()}
    out = tmp_path / "out"
    r = _sparsify(hub_cache, "prune", "tiny-org/tiny-llama", "-o", out, "--sparsity", "0.5", "--samples", "4",
                  "--seq-len", "32", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model"] == "tiny-org/tiny-llama"
    assert "base_model: tiny-org/tiny-llama" in (out / "README.md").read_text()
    assert {p: p.read_bytes() for p in hub_cache.rglob("*") if p.is_file()} == before  # the cache is input too
    r = _sparsify(hub_cache, "inspect", "tiny-org/tiny-llama", "--revision", SHA, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["num_layers"] == 2


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["other-org/missing"], "not in the Hugging Face cache"),
        (["tiny-org/tiny-llama", "--revision", "v2"], "revision 'v2'"),
    ],
)
def test_what_is_not_cached_is_one_line(hub_cache, tmp_path, args, fragment):
    r = _sparsify(hub_cache, "inspect", *args)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], r.stderr


def test_output_may_not_hold_the_cache(hub_cache, tmp_path):
    r = _sparsify(hub_cache, "prune", "tiny-org/tiny-llama", "-o", hub_cache.parent, "--sparsity", "0.5",
                  "--overwrite")  # fmt: skip
    assert r.returncode == 1 and "contains the model folder" in r.stderr, r.stderr
