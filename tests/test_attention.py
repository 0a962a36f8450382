"""Attention-pattern swap: native configs that plain transformers loads, and their exactness."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from typer.testing import CliRunner

import sparsify
from sparsify.algorithms.attention_masks import attention_fraction, sliding_window_mask
from sparsify.cli import app
from sparsify.recipe import parse_recipe
from tests import zoo
from tests.test_cli import assert_user_error
from tests.zoo import compress

NATIVE = {  # family -> model_type written
    "llama": "mistral",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3_text",
    "phi3": "phi3",
}
IDS = torch.randint(3, zoo.VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))


def assert_decoding_equals_recomputing(model, prompt: torch.Tensor, steps: int):
    """Greedy ``generate`` (with whatever cache it builds) equals re-running the whole sequence without a cache
    at every step; returns the cache generation ended with."""
    with torch.no_grad():
        out = model.generate(
            prompt, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, return_dict_in_generate=True
        )
        reference = prompt
        for _ in range(steps):
            step = model(input_ids=reference, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            reference = torch.cat([reference, step], 1)
    assert torch.equal(out.sequences, reference)
    return getattr(out, "cache", None) or out.past_key_values


def _window(src, out, window, global_every=0):
    step = {"type": "attention", "pattern": "sliding-window", "window": window, "global_every": global_every}
    return compress(src, parse_recipe({"passes": [step]}), out)


def _logits(path) -> torch.Tensor:
    model = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("family", list(NATIVE))
def test_window_longer_than_input_is_exact_and_native(family, model_dir, tmp_path):
    src = model_dir(family)
    report = _window(src, tmp_path / "out", 64)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == NATIVE[family] and config["sliding_window"] == 64
    loaded = T.AutoConfig.from_pretrained(tmp_path / "out")
    assert loaded.sliding_window == 64
    torch.testing.assert_close(_logits(tmp_path / "out"), _logits(src), rtol=0, atol=1e-5)
    assert all(r["status"].startswith("native") for r in report["layers"])


@pytest.mark.parametrize("family", list(NATIVE))
def test_shorter_window_changes_only_positions_past_it(family, model_dir, tmp_path):
    src = model_dir(family)
    _window(src, tmp_path / "out", 8)
    dense, windowed = _logits(src), _logits(tmp_path / "out")
    torch.testing.assert_close(windowed[:, :8], dense[:, :8], rtol=0, atol=1e-5)
    assert (windowed[:, 8:] - dense[:, 8:]).abs().amax() > 1e-3, "the window must take effect past its length"


def test_one_layer_window_equals_dense_attention_on_the_last_window(tmp_path):
    """RoPE is relative, so in a 1-layer model position t under window W sees exactly what the dense
    model sees when fed only the W tokens ending at t."""
    cfg = zoo.CONFIGS["llama"]()
    cfg.num_hidden_layers = 1
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    zoo.tokenizer().save_pretrained(tmp_path / "m")
    _window(tmp_path / "m", tmp_path / "out", 6)
    dense = T.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    windowed = _logits(tmp_path / "out")
    with torch.no_grad():
        for t in (6, 13, 31):
            ref = dense(input_ids=IDS[:, t - 5 : t + 1]).logits[:, -1]
            torch.testing.assert_close(windowed[:, t], ref, rtol=1e-4, atol=1e-4)


def test_global_every_writes_per_layer_types(model_dir, tmp_path):
    report = _window(model_dir("llama"), tmp_path / "mini", 8, global_every=2)
    config = json.loads((tmp_path / "mini" / "config.json").read_text())
    # model_type mistral + layer_types: transformers loads it as Ministral, vLLM runs MistralForCausalLM,
    # whose Llama code honours layer_types (vLLM's registry has no MinistralForCausalLM)
    assert config["model_type"] == "mistral" and config["architectures"] == ["MistralForCausalLM"]
    assert config["layer_types"] == ["sliding_attention", "full_attention"]
    model = T.AutoModelForCausalLM.from_pretrained(tmp_path / "mini")
    assert type(model).__name__ == "MinistralForCausalLM"
    assert [r["pattern"] for r in report["layers"]] == ["sliding-window", "full"]
    first, second = report["layers"]
    assert second["flops_fraction"] == 1.0 and first["flops_at"] == 256  # the model's context, under 4096
    assert first["flops_fraction"] == pytest.approx(attention_fraction(sliding_window_mask(256, 8)))
    _window(model_dir("llama"), tmp_path / "uniform", 8)
    assert (_logits(tmp_path / "mini") - _logits(tmp_path / "uniform")).abs().amax() > 1e-4
    qwen = _window(model_dir("qwen2"), tmp_path / "qwen", 8, global_every=2)
    assert json.loads((tmp_path / "qwen" / "config.json").read_text())["layer_types"] == [
        "sliding_attention",
        "full_attention",
    ]
    assert qwen["layers"][0]["window"] == 8


@pytest.fixture(scope="module")
def gemma3_mixed(tmp_path_factory):
    """Gemma 3 with its real layer mix: 6 layers, the 6th full; local RoPE base 10k, global 1M."""
    folder = zoo.save("gemma3_text", tmp_path_factory.mktemp("g3") / "gemma3", layers=6)
    config = json.loads((folder / "config.json").read_text())
    assert config["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    rope = config["rope_parameters"]
    assert rope["sliding_attention"]["rope_theta"] != rope["full_attention"]["rope_theta"]
    return folder


@pytest.mark.parametrize(("global_every", "native"), [(6, True), (0, False), (3, False), (2, False)])
def test_gemma3_windows_keep_each_layers_rope(gemma3_mixed, tmp_path, global_every, native):
    """A window longer than the input reproduces the dense logits whichever layers it is put on: each layer keeps
    the RoPE its own layer type gives it (native only when the layer types stay the model's own)."""
    out = tmp_path / "out"
    report = _window(gemma3_mixed, out, 64, global_every=global_every)
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"] == "gemma3_text") is native
    if native:
        assert config["layer_types"] == json.loads((gemma3_mixed / "config.json").read_text())["layer_types"]
        got = _logits(out)
    else:
        assert config["model_type"] == "sparsify_gemma3_text"
        assert any("rope_parameters" in n for n in report["notes"])
        with torch.no_grad():
            got = sparsify.load(out).eval()(input_ids=IDS).logits
    torch.testing.assert_close(got, _logits(gemma3_mixed), rtol=1e-5, atol=1e-5)
    expected = ["full" if global_every and (i + 1) % global_every == 0 else "sliding-window" for i in range(6)]
    assert [r["pattern"] for r in report["layers"]] == expected


def test_gemma3_layer_types_rewritten_natively_would_change_rope(gemma3_mixed, tmp_path):
    """Why the rule above exists: the same window written as native layer types moves layer 6 to local RoPE."""
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(gemma3_mixed, moved)
    config = json.loads((moved / "config.json").read_text())
    config["layer_types"] = ["sliding_attention"] * 6
    config["sliding_window"] = 64
    (moved / "config.json").write_text(json.dumps(config))
    assert (_logits(moved) - _logits(gemma3_mixed)).abs().amax() > 1e-3


def test_gemma3_shorter_window_changes_only_positions_past_it(gemma3_mixed, tmp_path):
    _window(gemma3_mixed, tmp_path / "out", 8)
    with torch.no_grad():
        got = sparsify.load(tmp_path / "out").eval()(input_ids=IDS).logits
    dense = _logits(gemma3_mixed)
    torch.testing.assert_close(got[:, :8], dense[:, :8], rtol=1e-5, atol=1e-5)
    assert (got[:, 8:] - dense[:, 8:]).abs().amax() > 1e-4


def test_prune_then_window_in_one_recipe(model_dir, tmp_path):
    recipe = parse_recipe(
        {
            "calibration": {"samples": 4, "seq_len": 32},
            "passes": [
                {"type": "prune", "method": "wanda", "sparsity": 0.5},
                {"type": "attention", "pattern": "sliding-window", "window": 16},
            ],
        }
    )
    report = compress(model_dir("llama"), recipe, tmp_path / "out")
    model = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == "MistralForCausalLM" and model.config.sliding_window == 16
    q = model.model.layers[0].self_attn.q_proj.weight
    assert (q == 0).float().mean().item() == pytest.approx(0.5, abs=1 / 64)
    assert {r["method"] for r in report["layers"]} == {"wanda", "attention"}


runner = CliRunner()


def test_cli_attention_and_report(model_dir, tmp_path):
    out = tmp_path / "out"
    r = runner.invoke(app, ["attention", str(model_dir("qwen3")), "-o", str(out), "--window", "16", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["layers"][0]["status"] == "native: qwen3"
    md = runner.invoke(app, ["report", str(out)])
    assert md.exit_code == 0 and "## Attention" in md.stdout


@pytest.mark.parametrize(
    ("family", "args", "fragment"),
    [
        ("llama", ["--window", "0"], "window"),
        ("llama", [], "needs a window"),
        ("bert", ["--window", "8"], "--pattern local"),
        ("bert", ["--pattern", "sinks", "--window", "8", "--sinks", "2"], "is an encoder"),
        ("llama", ["--pattern", "local", "--window", "8"], "bidirectional, for encoders"),
        ("llama", ["--pattern", "sinks", "--window", "8"], "needs sinks >= 1"),
        ("llama", ["--window", "8", "--sinks", "4"], "sinks applies to pattern sinks"),
        ("llama", ["--pattern", "block-sparse"], "needs block_size"),
        ("llama", ["--pattern", "block-sparse", "--block-size", "0"], "--block-size"),
        ("llama", ["--pattern", "block-sparse", "--block-size", "48"], "does not divide max_position_embeddings 256"),
        ("llama", ["--pattern", "block-sparse", "--block-size", "8", "--window", "8"], "takes block_size, not window"),
        ("phi3", ["--window", "8", "--global-every", "2"], "one sliding_window"),
        ("llama", ["--window", "8", "--global-every", "1"], "no windowed layer"),
    ],
)
def test_attention_errors(family, args, fragment, model_dir, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["attention", str(model_dir(family)), "-o", str(out), *args])
    assert_user_error(result, out, fragment)


def test_attention_on_an_unknown_family_is_refused(tmp_path):
    folder = tmp_path / "falcon"
    cfg = T.FalconConfig(vocab_size=zoo.VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    out = tmp_path / "out"
    args = ["attention", str(folder), "-o", str(out), "--pattern", "sinks", "--window", "8", "--sinks", "2"]
    assert_user_error(runner.invoke(app, args), out, "need a known family")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_generation_past_the_window_uses_a_bounded_cache(family, model_dir, tmp_path):
    """Greedy decoding with the runtime's sliding-window cache equals recomputing the windowed forward,
    and the cache holds at most the window, however long the generation."""
    _window(model_dir(family), tmp_path / "out", 8)
    model = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    cache = assert_decoding_equals_recomputing(model, IDS[:1, :12], 30)
    assert all(layer.keys.shape[-2] <= 8 for layer in cache.layers)
