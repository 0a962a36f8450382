"""Structured pruning: channels, head groups and layers physically removed, written as smaller native configs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

import sparsify
from sparsify.algorithms.structured import channel_scores, kept_width, layers_to_remove
from sparsify.recipe import parse_recipe
from tests import zoo
from tests.test_cli import FAST, assert_user_error, run
from tests.test_families import _load, _outputs, assert_reload_equals_memory
from tests.zoo import compress

CALIB = {"samples": 8, "seq_len": 32, "batch_size": 4}
HEADS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"]  # head_dim in the config
IDS = torch.randint(3, zoo.VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))


def _recipe(*steps: dict) -> object:
    return parse_recipe({"calibration": CALIB, "passes": list(steps)})


def _config(path) -> dict:
    return json.loads((path / "config.json").read_text())


def _shapes(path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in load_file(path / "model.safetensors").items()}


STEPS = {
    "channels": {"type": "prune", "structured": "channels", "ratio": 0.5, "metric": "wanda"},
    "heads": {"type": "prune", "structured": "heads", "ratio": 0.5, "metric": "flap"},
    "layers": {"type": "prune", "structured": "layers", "remove": 1, "metric": "angular"},
}
CASES = [(f, w) for f in zoo.CONFIGS for w in ("channels", "layers")] + [(f, "heads") for f in HEADS]


@pytest.mark.parametrize(("family", "what"), CASES)
def test_structured_is_smaller_native_and_reload_equals_memory(family, what, model_dir, tmp_path):
    src, out = model_dir(family), tmp_path / "out"
    report = compress(src, _recipe(STEPS[what]), out)
    before, after = _config(src), _config(out)
    dense = _load(family, src)
    model = _load(family, out)  # plain transformers: the config matches every tensor
    if what == "channels":
        assert model.config.intermediate_size if hasattr(model.config, "intermediate_size") else True
        width = getattr(dense.config, "intermediate_size", None) or getattr(dense.config, "ffn_dim", None)
        width = width or 4 * dense.config.hidden_size  # GPT-2's n_inner=None
        new = getattr(model.config, "intermediate_size", None) or getattr(model.config, "ffn_dim", None)
        assert (new or model.config.n_inner) == width // 2
    elif what == "heads":
        assert model.config.num_attention_heads == dense.config.num_attention_heads // 2
        assert model.config.num_key_value_heads == dense.config.num_key_value_heads // 2
        assert after["head_dim"] == (getattr(dense.config, "head_dim", None) or 16)
    else:
        assert model.config.num_hidden_layers == dense.config.num_hidden_layers - 1
        for key, value in before.items():  # every per-layer list follows
            if isinstance(value, list) and len(value) == dense.config.num_hidden_layers:
                assert len(after[key]) == model.config.num_hidden_layers, key
    params = sum(p.numel() for p in model.parameters())
    assert params < sum(p.numel() for p in dense.parameters())
    assert report["totals"]["parameters"] <= sum(t.numel() for t in load_file(src / "model.safetensors").values())
    assert all(r["rel_error"] is not None for r in report["layers"])  # every pruned layer's output error measured
    assert_reload_equals_memory(family, src, _recipe(STEPS[what]), out)


@pytest.mark.parametrize("what", ["channels", "heads"])
def test_ratio_zero_writes_the_input_tensors(what, model_dir, tmp_path):
    src = model_dir("llama")
    compress(src, _recipe({**STEPS[what], "ratio": 0.0}), tmp_path / "out")
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _edited(model_dir, tmp_path, family: str, edit) -> object:
    src = tmp_path / "src"
    shutil.copytree(model_dir(family), src)
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    return src


def _logits(path, family="llama") -> torch.Tensor:
    return _outputs(_load(family, path), IDS)


def test_removing_channels_whose_weights_are_zero_is_exact(model_dir, tmp_path):
    def zero(t):
        for i in range(2):
            for n in ("gate_proj", "up_proj"):
                t[f"model.layers.{i}.mlp.{n}.weight"][:40] = 0
            t[f"model.layers.{i}.mlp.down_proj.weight"][:, :40] = 0

    src = _edited(model_dir, tmp_path, "llama", zero)
    step = {"type": "prune", "structured": "channels", "ratio": 40 / 128, "metric": "magnitude", "multiple_of": 8}
    compress(src, _recipe(step), tmp_path / "out")
    assert _config(tmp_path / "out")["intermediate_size"] == 88
    torch.testing.assert_close(_logits(tmp_path / "out"), _logits(src), rtol=1e-5, atol=1e-5)


def test_removing_a_head_group_whose_weights_are_zero_is_exact(model_dir, tmp_path):
    def zero(t):  # llama fixture: 4 heads, 2 KV heads of head_dim 16; group 1 = heads 2, 3 and KV head 1
        for i in range(2):
            p = f"model.layers.{i}.self_attn."
            t[p + "q_proj.weight"][32:] = 0
            t[p + "k_proj.weight"][16:] = 0
            t[p + "v_proj.weight"][16:] = 0
            t[p + "o_proj.weight"][:, 32:] = 0

    src = _edited(model_dir, tmp_path, "llama", zero)
    compress(src, _recipe({**STEPS["heads"], "metric": "magnitude"}), tmp_path / "out")
    torch.testing.assert_close(_logits(tmp_path / "out"), _logits(src), rtol=1e-5, atol=1e-5)


def test_removing_a_layer_that_is_the_identity_is_exact(model_dir, tmp_path):
    def zero(t):  # no attention output and no MLP output: layer 1 adds nothing to the residual stream
        t["model.layers.1.self_attn.o_proj.weight"].zero_()
        t["model.layers.1.mlp.down_proj.weight"].zero_()

    src = _edited(model_dir, tmp_path, "llama", zero)
    report = compress(src, _recipe({**STEPS["layers"], "metric": "block-influence"}), tmp_path / "out")
    assert any("removed layers [1]" in n for n in report["notes"])
    torch.testing.assert_close(_logits(tmp_path / "out"), _logits(src), rtol=1e-5, atol=1e-5)


def test_bias_compensation_of_a_constant_channel_is_exact(model_dir, tmp_path):
    """OPT: fc1 row j zero with bias 1 makes relu output 1 on every token; FLAP scores it 0 and its
    contribution W_fc2[:, j] moves into fc2's bias. (The other channels get a large bias so that none of
    them is dead, i.e. constant 0, on the calibration text but not on other text.)"""

    def constant(t):
        for i in range(2):
            t[f"model.decoder.layers.{i}.fc1.weight"][:16] = 0
            t[f"model.decoder.layers.{i}.fc1.bias"][:16] = 1.0
            t[f"model.decoder.layers.{i}.fc1.bias"][16:] += 10.0

    src = _edited(model_dir, tmp_path, "opt", constant)
    step = {"type": "prune", "structured": "channels", "ratio": 16 / 128, "metric": "flap", "bias_compensation": True}
    compress(src, _recipe(step), tmp_path / "out")
    dense = _logits(src, "opt")
    exact = (_logits(tmp_path / "out", "opt") - dense).abs().amax()
    assert exact < 1e-4  # float32 rounding: the moved terms are summed in another order
    without = {**step, "bias_compensation": False}
    compress(src, _recipe(without), tmp_path / "plain")
    assert (_logits(tmp_path / "plain", "opt") - dense).abs().amax() > 1000 * exact


def test_bias_compensation_adds_native_bias_fields(model_dir, tmp_path):
    """Llama has no MLP biases; mlp_bias: true gives them, zero except the compensation on down_proj."""
    step = {"type": "prune", "structured": "channels", "ratio": 0.25, "metric": "flap", "bias_compensation": True}
    compress(model_dir("llama"), _recipe(step), tmp_path / "out")
    assert _config(tmp_path / "out")["mlp_bias"] is True
    w = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(w["model.layers.0.mlp.gate_proj.bias"], torch.zeros(96))
    assert w["model.layers.0.mlp.down_proj.bias"].abs().sum() > 0
    _load("llama", tmp_path / "out")


def test_layer_removal_shortens_layer_types_and_sparsify_patterns(tmp_path):
    src = zoo.save("gemma3_text", tmp_path / "g3", layers=6)
    types = _config(src)["layer_types"]
    report = compress(src, _recipe({**STEPS["layers"], "remove": 2, "metric": "block-influence"}), tmp_path / "out")
    removed = next(n for n in report["notes"] if "removed layers" in n)
    gone = json.loads(removed.split("removed layers ")[1].split(" by")[0])
    assert _config(tmp_path / "out")["layer_types"] == [t for i, t in enumerate(types) if i not in gone]
    recipe = _recipe(
        {"type": "attention", "pattern": "sinks", "window": 8, "sinks": 2}, {**STEPS["layers"], "remove": 2}
    )
    compress(src, recipe, tmp_path / "sinks")
    cfg = _config(tmp_path / "sinks")
    assert len(cfg["sparsify_attention"]["layers"]) == 4 and len(cfg["layer_types"]) == 4
    assert cfg["num_hidden_layers"] == 4
    sparsify.load(tmp_path / "sinks")(input_ids=IDS)


RECIPES = {
    "channels-then-wanda": [STEPS["channels"], {"type": "prune", "method": "wanda", "sparsity": 0.5}],
    "wanda-then-heads": [{"type": "prune", "method": "wanda", "sparsity": 0.5}, STEPS["heads"]],
    "window-then-layers-then-2:4": [
        {"type": "attention", "pattern": "sliding-window", "window": 8},
        STEPS["layers"],
        {"type": "prune", "method": "sparsegpt", "pattern": "2:4"},
    ],
    "prune-then-sinks-then-channels": [  # two stages: channels calibrates with the sinks pattern
        {"type": "prune", "method": "magnitude", "sparsity": 0.3},
        {"type": "attention", "pattern": "sinks", "window": 8, "sinks": 2},
        STEPS["channels"],
    ],
    "layers-then-window": [STEPS["layers"], {"type": "attention", "pattern": "sliding-window", "window": 8}],
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipes_mixing_structured_unstructured_and_attention(name, model_dir, tmp_path):
    report = compress(model_dir("llama"), _recipe(*RECIPES[name]), tmp_path / "out")
    cfg = _config(tmp_path / "out")
    model = sparsify.load(tmp_path / "out").eval()
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    assert torch.isfinite(logits).all()
    kinds = {r["kind"] for r in report["layers"]}
    types = {s["type"] for s in RECIPES[name]}
    assert ("attention" in kinds) == ("attention" in types)
    if any(s.get("structured") == "channels" for s in RECIPES[name]):
        assert cfg["intermediate_size"] == 64
    if any(s.get("method") == "wanda" for s in RECIPES[name]):
        q = load_file(tmp_path / "out" / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
        assert (q == 0).float().mean() >= 0.49  # the unstructured pass kept its sparsity after/before reshaping


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--structured", "channels", "--ratio", "1.0"], "ratio"),
        (["--structured", "channels"], "needs a ratio"),
        (["--structured", "layers", "--remove", "2"], "leaves none"),
        (["--structured", "heads", "--ratio", "0.9"], "removes all 2 head groups"),
        (["--structured", "channels", "--ratio", "0.5", "--metric", "angular"], "metric"),
        (["--structured", "channels", "--ratio", "0.5", "--sparsity", "0.5"], "sparsity applies to unstructured"),
        (["--structured", "channels", "--ratio", "0.5", "--targets", "q_proj"], "every layer"),
        (["--structured", "layers", "--remove", "1", "--bias-compensation"], "takes remove"),
        (["--ratio", "0.5"], "structured"),
    ],
)
def test_structured_bad_input(args, fragment, model_dir, tmp_path):
    out = tmp_path / "out"
    assert_user_error(run("prune", model_dir("llama"), "-o", out, *FAST, *args), out, fragment)


@pytest.mark.parametrize(("family", "args", "fragment"), [
    ("gpt2", ["--structured", "heads", "--ratio", "0.5"], "head_dim"),
    ("bert", ["--structured", "heads", "--ratio", "0.5"], "head_dim"),
    ("qwen2", ["--structured", "channels", "--ratio", "0.5", "--bias-compensation"], "no config field"),
    ("falcon", ["--structured", "channels", "--ratio", "0.5"], "architecture table"),
])  # fmt: skip
def test_what_a_family_cannot_express_is_refused(family, args, fragment, model_dir, tmp_path):
    if family == "falcon":
        src = tmp_path / "falcon"
        T.AutoModelForCausalLM.from_config(T.FalconConfig(vocab_size=320, hidden_size=64, num_hidden_layers=2,
                                                          num_attention_heads=4)).save_pretrained(src)  # fmt: skip
        zoo.tokenizer().save_pretrained(src)
    else:
        src = model_dir(family)
    out = tmp_path / "out"
    assert_user_error(run("prune", src, "-o", out, *FAST, *args), out, fragment)


def test_cli_structured_end_to_end(model_dir, tmp_path):
    r = run("prune", model_dir("llama"), "-o", tmp_path / "out", *FAST, "--structured", "channels", "--ratio", "0.25",
            "--metric", "flap", "--bias-compensation", "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["totals"]["structured_layers"] == 2 and report["tables"][0]["kind"] == "structured"
    assert any("FFN width 128 -> 96" in n for n in report["notes"])
    md = run("report", tmp_path / "out")
    assert "| structured | 2 layers: 32 of 128 channels each |" in md.stdout
    assert "Structured pruning, per layer" in md.stdout


def test_importance_functions_against_naive_loops():
    g = torch.Generator().manual_seed(0)
    W_in, W_out = [torch.randn(12, 5, generator=g)], torch.randn(5, 12, generator=g)
    X = torch.randn(40, 12, generator=g)  # the output projection's inputs
    sq, mean = X.pow(2).mean(0), X.mean(0)
    for j in range(12):
        mag = sum(float(W_in[0][j, k] ** 2) for k in range(5)) + sum(float(W_out[i, j] ** 2) for i in range(5))
        wanda = sum(abs(float(W_out[i, j])) * float(X[:, j].pow(2).mean().sqrt()) for i in range(5))
        flap = float(X[:, j].var(unbiased=False)) * sum(float(W_out[i, j] ** 2) for i in range(5))
        assert channel_scores("magnitude", W_in, W_out)[j] == pytest.approx(mag, rel=1e-5)
        assert channel_scores("wanda", W_in, W_out, sq)[j] == pytest.approx(wanda, rel=1e-5)
        assert channel_scores("flap", W_in, W_out, sq, mean)[j] == pytest.approx(flap, rel=1e-4, abs=1e-6)
    assert kept_width(1536, 0.2, 8) == 1232 and kept_width(1536, 0.2, 64) == 1216 and kept_width(64, 0.99, 8) == 8
    assert layers_to_remove("block-influence", [0.3, 0.1, 0.5, 0.05], 2) == [1, 3]
    assert layers_to_remove("angular", [0.4, 0.2, 0.3], 2) == [1, 2]


def test_refit_output_is_the_least_squares_solution():
    from sparsify.algorithms.structured import refit_output

    g = torch.Generator().manual_seed(0)
    X = torch.randn(2000, 24, generator=g, dtype=torch.float64) + 0.5  # (N, n), non-zero mean
    W = torch.randn(8, 24, generator=g, dtype=torch.float64)  # (out, n)
    kept = torch.tensor([0, 2, 3, 5, 8, 13, 21])
    H = X.T @ X / X.shape[0]
    W_new, b = refit_output(W, H, kept, dampening=0.0)
    ref = torch.linalg.lstsq(X[:, kept], X @ W.T).solution.T  # (out, k)
    torch.testing.assert_close(W_new, ref, rtol=1e-8, atol=1e-8)
    assert b is None
    W_aug, b = refit_output(W, H, kept, mean=X.mean(0), dampening=0.0)
    ones = torch.ones(X.shape[0], 1, dtype=torch.float64)
    ref_aug = torch.linalg.lstsq(torch.cat([X[:, kept], ones], 1), X @ W.T).solution.T  # (out, k + 1)
    torch.testing.assert_close(W_aug, ref_aug[:, :-1], rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(b, ref_aug[:, -1], rtol=1e-8, atol=1e-8)


def test_refit_is_exact_for_channels_that_copy_kept_ones_and_lowers_the_error(model_dir, tmp_path):
    """Llama: the last 32 FFN channels are copies of the first 32 (same gate/up rows): removing them and refitting
    down_proj moves their columns onto their twins exactly; on the unedited model refit lowers the layer error."""

    def twins(t):
        for i in range(2):
            for name in ("gate_proj", "up_proj"):
                w = t[f"model.layers.{i}.mlp.{name}.weight"]
                w[96:] = w[:32]

    src = _edited(model_dir, tmp_path, "llama", twins)
    step = {"type": "prune", "structured": "channels", "ratio": 0.25, "metric": "wanda", "refit": True}
    with torch.no_grad():  # make the twins the least important by magnitude: shrink their down columns
        t = load_file(src / "model.safetensors")
        for i in range(2):
            t[f"model.layers.{i}.mlp.down_proj.weight"][:, 96:] *= 1e-3
        save_file(t, src / "model.safetensors", metadata={"format": "pt"})
    report = compress(src, _recipe(step), tmp_path / "out")
    assert _config(tmp_path / "out")["intermediate_size"] == 96
    torch.testing.assert_close(_logits(tmp_path / "out", "llama"), _logits(src, "llama"), rtol=1e-4, atol=1e-4)
    assert "refit" in report["passes"][0]["description"]

    plain = {"type": "prune", "structured": "channels", "ratio": 0.25, "metric": "wanda"}
    a = compress(model_dir("llama"), _recipe(plain), tmp_path / "plain")
    b = compress(model_dir("llama"), _recipe({**plain, "refit": True}), tmp_path / "refit")

    def layer_error(report):
        return sum(r["rel_error"] for r in report["layers"]) / len(report["layers"])

    assert layer_error(b) < layer_error(a)
