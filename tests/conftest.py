from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: one thread per worker, and per process it starts
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))

from tests import zoo

# The quick loop's families (pytest -m "not slow"): a decoder (Llama: grouped KV heads, RoPE, gated MLP) and an
# encoder (BERT: post-norm). A test parametrized over "family" is `slow` for the others; CI runs every family.
FAST_FAMILIES = frozenset({"llama", "bert"})
# The training loops (heal, distill) are run on every compression "case" in CI; the quick loop keeps one.
TRAINING_MODULES, FAST_CASE = frozenset({"test_heal", "test_distill"}), "sparsegpt-2:4"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        family, case = params.get("family"), params.get("case")
        module = getattr(item, "module", None)
        trains = module is not None and module.__name__.rpartition(".")[2] in TRAINING_MODULES
        if (isinstance(family, str) and family not in FAST_FAMILIES) or (trains and case not in (None, FAST_CASE)):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def _own_cache(tmp_path_factory: pytest.TempPathFactory):
    """sparsify's cache (converted GGUF models, the input measurements runs reuse) in the session's own folder:
    nothing read from or left in the user's (subprocesses inherit it)."""
    previous = os.environ.get("SPARSIFY_CACHE")
    os.environ["SPARSIFY_CACHE"] = str(tmp_path_factory.mktemp("sparsify-cache"))
    yield
    if previous is None:
        os.environ.pop("SPARSIFY_CACHE", None)
    else:
        os.environ["SPARSIFY_CACHE"] = previous


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory):
    """Factory: a saved tiny model folder per family (and dtype), built once per session."""
    made: dict[tuple[str, str], Path] = {}

    def get(family: str, dtype: torch.dtype = torch.float32) -> Path:
        key = (family, str(dtype))
        if key not in made:
            made[key] = zoo.save(family, tmp_path_factory.mktemp(f"{family}-{str(dtype)[6:]}"), dtype=dtype)
        return made[key]

    return get


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n\n".join(zoo.training_text()))
    return path
