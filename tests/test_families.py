"""Every family × method × pattern, end to end through files: sparsity, pattern, reload == memory, untouched rest."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from safetensors import safe_open

from sparsify.arch import lookup
from sparsify.checkpoint import open_model
from sparsify.data import load_text, sample_windows, tokenize
from sparsify.evaluate import load_tokenizer
from sparsify.passes.prune_methods import PRUNE_METHODS
from sparsify.pipeline import compress_model
from sparsify.recipe import parse_recipe
from tests import zoo
from tests.zoo import compress

METHODS = list(PRUNE_METHODS)  # every registered method, on every family
PATTERNS = [("unstructured", 0.5), ("2:4", None)]


def _recipe(method: str, pattern: str, sparsity: float | None):
    step = {"type": "prune", "method": method, "pattern": pattern}
    if sparsity is not None:
        step["sparsity"] = sparsity
    return parse_recipe({"calibration": {"samples": 8, "seq_len": 32, "batch_size": 4}, "passes": [step]})


def _load(family: str, path):
    auto = T.AutoModel if family == "bert" else T.AutoModelForCausalLM
    return auto.from_pretrained(path, dtype=torch.float32).eval()


def _outputs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _weights(path) -> dict[str, torch.Tensor]:
    source = open_model(path).source
    return source.get_many(source.keys())


def assert_reload_equals_memory(family: str, src, recipe, out) -> None:
    """The saved output, reloaded, gives the logits of the same recipe applied to the model in memory."""
    memory_model = _load(family, src)
    tokens = sample_windows(tokenize(load_text(None), load_tokenizer(src)), 8, 32, 0)
    compress_model(memory_model, recipe, tokens)
    ids = tokens[:2]
    torch.testing.assert_close(_outputs(_load(family, out), ids), _outputs(memory_model, ids), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", list(zoo.CONFIGS))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("pattern", "sparsity"), PATTERNS)
def test_prune_family(family, method, pattern, sparsity, model_dir, tmp_path):
    src = model_dir(family)
    recipe = _recipe(method, pattern, sparsity)
    report = compress(src, recipe, tmp_path / "out")

    arch = lookup(zoo.CONFIGS[family]().model_type)
    pruned = [r for r in report["layers"] if r["status"] == "pruned"]
    n_layers = 2
    assert len(pruned) == n_layers * len(arch.targets), "every default target Linear is pruned"

    before, after = _weights(src), _weights(tmp_path / "out")
    assert before.keys() == after.keys()
    target_keys = set()
    for record in pruned:
        key = record["name"] + ".weight"  # the zoo saves checkpoints with the model's own names
        assert key in after
        target_keys.add(key)
        W = after[key]
        W = W.t() if family == "gpt2" else W  # Conv1D stores (in, out)
        zeros = (W == 0).float().mean().item()
        if pattern == "2:4":
            groups = (W != 0).reshape(W.shape[0], -1, 4).sum(-1)  # (out, in/4) non-zeros per group
            assert (groups <= 2).all(), f"{key} breaks 2:4"
            assert zeros >= 0.5
        else:
            assert abs(zeros - 0.5) <= 1.0 / W.shape[1], f"{key}: sparsity {zeros}"
        assert record["sparsity"] == pytest.approx(zeros)
        assert 0.0 <= record["rel_error"] < 1.0

    # Everything that is not a target (embeddings, lm_head, norms, biases) is byte-for-byte unchanged.
    for key in before:
        if key not in target_keys:
            assert torch.equal(before[key], after[key]), f"{key} changed"
    assert len(target_keys) == len(pruned)

    # Reloading the output gives the in-memory result of the same recipe on the same data.
    assert_reload_equals_memory(family, src, recipe, tmp_path / "out")


def test_target_key_lookup_is_not_vacuous(model_dir):
    """The family test above must find every Linear; a typo in the table would leave none to check."""
    keys = set(_weights(model_dir("gpt2")))
    assert "transformer.h.0.attn.c_attn.weight" in keys
    with safe_open(str(model_dir("llama") / "model.safetensors"), "pt") as f:
        assert "model.layers.1.mlp.down_proj.weight" in f.keys()


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3", "bert"])
def test_true_sequential_stages(family, model_dir, tmp_path):
    """sequential: true calibrates q/k/v, o, gate/up, down one after another; same guarantees hold."""
    src = model_dir(family)
    step = {"type": "prune", "method": "sparsegpt", "sparsity": 0.5, "sequential": True}
    recipe = parse_recipe({"calibration": {"samples": 8, "seq_len": 32, "batch_size": 4}, "passes": [step]})
    report = compress(src, recipe, tmp_path / "seq")
    compress(src, _recipe("sparsegpt", "unstructured", 0.5), tmp_path / "plain")
    order = [r["name"] for r in report["layers"]]
    arch = lookup(zoo.CONFIGS[family]().model_type)
    prefix = order[0][: order[0].index(arch.stages[0][0])]
    assert order[: len(arch.targets)] == [prefix + t for t in arch.targets]  # data-flow order
    for r in report["layers"]:
        assert abs(r["sparsity"] - 0.5) <= 1.0 / r["shape"][1]
    seq_w, plain_w = _weights(tmp_path / "seq"), _weights(tmp_path / "plain")
    first = arch.stages[0][0]
    later = arch.stages[-1][0]
    first_key, later_key = f"{prefix}{first}.weight", f"{prefix}{later}.weight"
    assert torch.equal(seq_w[first_key], plain_w[first_key])  # the first stage sees the same inputs
    assert not torch.equal(seq_w[later_key], plain_w[later_key])  # later stages see pruned upstream
    assert_reload_equals_memory(family, src, recipe, tmp_path / "seq")


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize(("pattern", "sparsity"), PATTERNS)
def test_dense_targets(family, pattern, sparsity, model_dir, tmp_path):
    """SparseGPT fitted to the dense model's outputs: exact sparsity/pattern, reload == memory,
    layer 0 (whose inputs have not drifted) equal to plain SparseGPT, later layers not."""
    src = model_dir(family)
    step = {"type": "prune", "method": "sparsegpt", "pattern": pattern, "dense_targets": True}
    if sparsity is not None:
        step["sparsity"] = sparsity
    recipe = parse_recipe({"calibration": {"samples": 8, "seq_len": 32, "batch_size": 4}, "passes": [step]})
    report = compress(src, recipe, tmp_path / "dt")
    compress(src, _recipe("sparsegpt", pattern, sparsity), tmp_path / "plain")
    dt, plain = _weights(tmp_path / "dt"), _weights(tmp_path / "plain")
    for r in report["layers"]:
        key = r["name"] + ".weight"
        W = dt[key].t() if family == "gpt2" else dt[key]
        if pattern == "2:4":
            assert ((W != 0).reshape(W.shape[0], -1, 4).sum(-1) <= 2).all()
        else:
            assert abs((W == 0).float().mean().item() - 0.5) <= 1.0 / W.shape[1]
        if r["layer"] == 0:
            torch.testing.assert_close(dt[key], plain[key], rtol=1e-4, atol=1e-5)
        else:
            assert not torch.allclose(dt[key], plain[key], atol=1e-5)
    assert_reload_equals_memory(family, src, recipe, tmp_path / "dt")
