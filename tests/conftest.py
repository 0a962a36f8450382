from __future__ import annotations

import gc
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

import sparsify.data
from tests import zoo


def _memoized_tokenize(original):
    """``sparsify.data.tokenize``, memoized for the test processes (the command the user runs is untouched).

    Tokenizing the embedded calibration text (~270k tokens) is about half of a tiny model's compress run, and the
    tests run it hundreds of times with the same text and the same tokenizer. Its result is a function of the
    documents and the tokenizer's own definition (its backend's JSON: model, normalizer, added tokens, padding and
    truncation), so each is tokenized once per process and every caller gets its own copy; a tokenizer without a
    backend is tokenized each time. Installed before the modules that import it, which bind this one."""
    memo: dict[tuple, torch.Tensor] = {}

    def tokenize(text: sparsify.data.Text, tokenizer) -> torch.Tensor:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            return original(text, tokenizer)
        key = (type(tokenizer), backend.to_str(), getattr(tokenizer, "split_special_tokens", None),
               tuple(text.documents))  # fmt: skip
        if key not in memo:
            if len(memo) >= 16:
                memo.clear()
            memo[key] = original(text, tokenizer)
        return memo[key].clone()

    tokenize.__wrapped__ = original  # type: ignore[attr-defined]
    return tokenize


sparsify.data.tokenize = _memoized_tokenize(sparsify.data.tokenize)

# The quick loop's families (pytest -m "not slow"): a decoder (Llama: grouped KV heads, RoPE, gated MLP) and an
# encoder (BERT: post-norm). A test parametrized over "family" is `slow` for the others; CI runs every family.
FAST_FAMILIES = frozenset({"llama", "bert"})
# Tests run over every compression "case" in CI keep a few in the quick loop: the training loops (heal, distill) one,
# the written recipe's round trip (test_plan) one prune, one quantization and one structured pruning.
QUICK_CASES = {
    "test_heal": {"sparsegpt-2:4"},
    "test_distill": {"sparsegpt-2:4"},
    "test_plan": {"sparsegpt-2:4", "w4a16", "channels"},
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        family, case = params.get("family"), params.get("case")
        module = getattr(item, "module", None)
        quick_cases = QUICK_CASES.get(module.__name__.rpartition(".")[2]) if module is not None else None
        if (
            (isinstance(family, str) and family not in FAST_FAMILIES)
            or (quick_cases is not None and case is not None and case not in quick_cases)
            or params.get("cli") == "process"  # the same commands run in-process in the quick loop (test_cli.CLI)
        ):
            item.add_marker(pytest.mark.slow)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """At the start of each test module, what is alive (torch, transformers, the test modules: ~400k objects) is
    collected and then frozen (gc.freeze): a later full collection skips it. sparsify's CLI runs one on every failure
    (cli/errors.py, _let_go), which over a test process's whole heap took 0.2-0.5 s, hundreds of times per loop; what
    a test creates is collected as before. The previous module's fixtures are gone by now: its garbage is not kept."""
    module = getattr(item, "module", None)
    if module is not None and module is not _frozen_at[0]:
        _frozen_at[0] = module
        gc.collect()
        gc.freeze()


_frozen_at: list[object] = [None]


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
    """The first 5 of the zoo's training topics, ~12k tokens: 16 windows of 256 to hold out and more to calibrate
    on, and short enough for the tests that evaluate all of it (eval --data FILE reads every window)."""
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n\n".join(zoo.training_text()[:5]))
    return path
