"""MODEL as a Hugging Face Hub repo id, offline against a pre-filled cache (the layout huggingface_hub writes)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from tests.test_cli import CLI, run, run_process

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


@pytest.fixture
def sparsify(hub_cache, monkeypatch):
    """The CLI with the cache as HF_HUB_CACHE and HF_HUB_OFFLINE=1: in-process as huggingface_hub holds them once
    imported (its constants), or with ``cli="process"`` as the environment of a process of its own."""

    def call(*args: object, cli: str = "in-process"):
        if cli == "process":
            return run_process(*args, env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache), "COLUMNS": "200"})
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        return run(*args)

    return call


@pytest.mark.parametrize("cli", CLI)
def test_a_repo_id_is_read_from_the_cache_offline(hub_cache, sparsify, tmp_path, cli):
    before = {p: p.read_bytes() for p in hub_cache.rglob("*") if p.is_file()}
    out = tmp_path / "out"
    r = sparsify("prune", "tiny-org/tiny-llama", "-o", out, "--sparsity", "0.5", "--samples", "4", "--seq-len", "32",
                 "--json", cli=cli)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["model"] == "tiny-org/tiny-llama"
    assert "base_model: tiny-org/tiny-llama" in (out / "README.md").read_text()
    assert {p: p.read_bytes() for p in hub_cache.rglob("*") if p.is_file()} == before  # the cache is input too
    r = sparsify("inspect", "tiny-org/tiny-llama", "--revision", SHA, "--json", cli=cli)
    assert r.exit_code == 0 and json.loads(r.stdout)["num_layers"] == 2


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["other-org/missing"], "not in the Hugging Face cache"),
        (["tiny-org/tiny-llama", "--revision", "v2"], "revision 'v2'"),
    ],
)
def test_what_is_not_cached_is_one_line(sparsify, args, fragment):
    r = sparsify("inspect", *args)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], r.stderr


def test_output_may_not_hold_the_cache(hub_cache, sparsify):
    r = sparsify("prune", "tiny-org/tiny-llama", "-o", hub_cache.parent, "--sparsity", "0.5", "--overwrite")
    assert r.exit_code == 1 and "contains the model folder" in r.stderr, r.stderr
