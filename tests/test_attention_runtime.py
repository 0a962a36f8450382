"""Patterns no runtime knows (sinks, block-sparse, local, windows on families without one), run by sparsify.load."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers as T
from typer.testing import CliRunner

import sparsify
from sparsify.algorithms.attention_masks import LayerPattern, pattern_mask
from sparsify.cli import app
from sparsify.errors import SparsifyError
from sparsify.recipe import parse_recipe
from sparsify.runtime.cache import BoundedCache, WindowCacheLayer, bounded_cache
from tests import zoo
from tests.test_attention import assert_decoding_equals_recomputing
from tests.zoo import compress

DECODERS = [f for f in zoo.CONFIGS if f != "bert"]
IDS = torch.randint(3, zoo.VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))


def _swap(src, out, **step):
    return compress(src, parse_recipe({"passes": [{"type": "attention", **step}]}), out)


def _out(model, ids=IDS, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        result = model(input_ids=ids, **kwargs)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def _dense(path) -> torch.nn.Module:
    return sparsify.load(path, dtype=torch.float32).eval()


def _masked_reference(model, p: LayerPattern, causal: bool, ids=IDS) -> torch.Tensor:
    """The dense model fed the pattern as an explicit 4D additive mask (the pure builder, tested on loops)."""
    mask = pattern_mask(p, ids.shape[1], causal=causal)  # (L, L)
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    return _out(model, ids, attention_mask=additive[None, None].expand(ids.shape[0], 1, -1, -1))


@pytest.mark.parametrize("family", DECODERS)
def test_sinks_covering_the_input_are_exact(family, model_dir, tmp_path):
    src, out = model_dir(family), tmp_path / "out"
    report = _swap(src, out, pattern="sinks", window=64, sinks=4)
    config = json.loads((out / "config.json").read_text())
    assert config["attn_implementation"] == "sparsify"
    assert config["sparsify_attention"]["layers"][0] == {"pattern": "sinks", "window": 64, "sinks": 4}
    model = sparsify.load(out).eval()
    assert model.config._attn_implementation == "sparsify"
    torch.testing.assert_close(_out(model), _out(_dense(src)), rtol=0, atol=1e-5)
    assert all(r["status"] == "sparsify: needs sparsify.load" for r in report["layers"])


PLAIN_LOADS = """
import json, sys, transformers
said = {}
for override in ({}, {"attn_implementation": "sdpa"}, {"attn_implementation": "eager"}):
    try:
        transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], **override)
        said[repr(override)] = None
    except Exception as e:
        said[repr(override)] = f"{type(e).__name__}: {e}"
print(json.dumps({"said": said, "sparsify": sorted(m for m in sys.modules if m.startswith("sparsify"))}))
"""


def test_plain_transformers_refuses_rather_than_run_dense_attention(model_dir, tmp_path):
    """In a fresh process, with or without an attn_implementation override: the model type is sparsify's own."""
    _swap(model_dir("llama"), tmp_path / "out", pattern="sinks", window=8, sinks=2)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "sparsify_llama" and config["architectures"] == ["SparsifyLlamaForCausalLM"]
    fresh = subprocess.run([sys.executable, "-c", PLAIN_LOADS, str(tmp_path / "out")], capture_output=True, text=True)
    assert fresh.returncode == 0, fresh.stderr
    result = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert result["sparsify"] == [] and len(result["said"]) == 3  # plain transformers, each override tried
    for override, said in result["said"].items():
        assert said is not None and "sparsify_llama" in said and "does not recognize" in said, (override, said)
    sparsify.load(tmp_path / "out")  # once registered, plain loading runs the pattern too
    registered = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(_out(registered), _out(sparsify.load(tmp_path / "out").eval()), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3", "gemma2", "opt"])
def test_shorter_window_with_sinks_changes_only_positions_past_the_window(family, model_dir, tmp_path):
    src = model_dir(family)
    _swap(src, tmp_path / "out", pattern="sinks", window=8, sinks=2)
    swapped, dense = _out(sparsify.load(tmp_path / "out").eval()), _out(_dense(src))
    torch.testing.assert_close(swapped[:, :8], dense[:, :8], rtol=0, atol=1e-5)
    assert (swapped[:, 8:] - dense[:, 8:]).abs().amax() > 1e-3, "the window must take effect past its length"


@pytest.mark.parametrize(
    ("family", "step", "pattern"),
    [
        ("llama", dict(pattern="sinks", window=6, sinks=3), LayerPattern("sinks", window=6, sinks=3)),
        ("gpt2", dict(pattern="sliding-window", window=5), LayerPattern("sliding-window", window=5)),
        (
            "gpt_neox",
            dict(pattern="block-sparse", block_size=8),
            LayerPattern("block-sparse", block_size=8, global_blocks=1),
        ),
        (
            "qwen2",
            dict(pattern="block-sparse", block_size=4, global_blocks=0),
            LayerPattern("block-sparse", block_size=4),
        ),
        ("bert", dict(pattern="local", window=9), LayerPattern("local", window=9)),
        (
            "bert",
            dict(pattern="block-sparse", block_size=8),
            LayerPattern("block-sparse", block_size=8, global_blocks=1),
        ),
    ],
)
def test_runtime_applies_exactly_the_pattern_mask(family, step, pattern, model_dir, tmp_path):
    src = model_dir(family)
    _swap(src, tmp_path / "out", **step)
    causal = family != "bert"
    torch.testing.assert_close(
        _out(sparsify.load(tmp_path / "out").eval()), _masked_reference(_dense(src), pattern, causal), rtol=0, atol=1e-5
    )


def test_random_blocks_differ_per_layer_and_match_the_config(model_dir, tmp_path):
    report = _swap(model_dir("bert"), tmp_path / "out", pattern="block-sparse", block_size=4, random_blocks=2)
    layers = json.loads((tmp_path / "out" / "config.json").read_text())["sparsify_attention"]["layers"]
    assert [entry.get("seed", 0) for entry in layers] == [0, 1]
    a, b = (pattern_mask(LayerPattern(**entry), 64, causal=False) for entry in layers)
    assert not torch.equal(a, b)
    assert 0 < report["layers"][0]["flops_fraction"] < 1


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_decoding_with_the_bounded_cache_equals_the_full_forward(family, model_dir, tmp_path):
    """Greedy decoding through sparsify.load's default cache equals recomputing the sinks+window forward
    from scratch at every step, and each windowed layer holds at most sinks + window - 1 keys."""
    _swap(model_dir(family), tmp_path / "out", pattern="sinks", window=8, sinks=2, global_every=2)
    model = sparsify.load(tmp_path / "out").eval()
    cache = assert_decoding_equals_recomputing(model, IDS[:1, :12], 30)
    assert isinstance(cache, BoundedCache)
    sizes = [layer.keys.shape[-2] for layer in cache.layers]
    assert sizes == [2 + 7, 41]  # layer 0: sinks + window - 1; layer 1 (full) every token fed back: 12 + 30 - 1


def test_cache_layer_keeps_sinks_and_the_recent_window():
    layer = WindowCacheLayer(window=4, sinks=2)
    seen = []
    for t in range(10):
        k = torch.full((1, 1, 1, 1), float(t))
        keys, _ = layer.update(k, k)
        seen.append(keys.flatten().tolist())
    assert seen[2] == [0, 1, 2]
    assert seen[9] == [0, 1, 6, 7, 8, 9]  # sinks 0, 1 plus the window of 4 ending at 9
    assert layer.keys.flatten().tolist() == [0, 1, 7, 8, 9] and layer.get_seq_length() == 10
    assert layer.get_mask_sizes(1) == (11, 0)


def test_bounded_cache_needs_the_config(model_dir):
    model = _dense(model_dir("llama"))
    with pytest.raises(SparsifyError, match="sparsify_attention"):
        bounded_cache(model)


def test_load_refuses_a_tampered_section(model_dir, tmp_path):
    _swap(model_dir("llama"), tmp_path / "out", pattern="sinks", window=8, sinks=2)
    path = tmp_path / "out" / "config.json"
    config = json.loads(path.read_text())
    config["sparsify_attention"]["layers"][0]["pattern"] = "dilated"
    path.write_text(json.dumps(config))
    with pytest.raises(SparsifyError, match="unknown attention pattern 'dilated'"):
        sparsify.load(tmp_path / "out")


def test_native_checkpoints_load_unchanged(model_dir, tmp_path):
    _swap(model_dir("qwen2"), tmp_path / "out", pattern="sliding-window", window=8)
    model = sparsify.load(tmp_path / "out")
    assert model.config._attn_implementation != "sparsify" and model.config.sliding_window == 8


def test_left_padding_matches_the_unpadded_row(model_dir, tmp_path):
    """Padding goes through transformers' own mask; a windowed pattern sees the same real tokens."""
    _swap(model_dir("llama"), tmp_path / "out", pattern="sliding-window", window=8)
    model = sparsify.load(tmp_path / "out").eval()
    ids = IDS[:1, :20]
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones_like(ids)], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    got = _out(model, padded, attention_mask=mask, position_ids=positions)[:, 4:]
    torch.testing.assert_close(got, _out(model, ids), rtol=1e-5, atol=1e-5)


def test_report_has_perplexity_at_each_context_length(model_dir, calib_file, tmp_path):
    out = tmp_path / "out"
    args = ["attention", str(model_dir("llama")), "-o", str(out), "--pattern", "sinks", "--window", "16"]
    args += ["--sinks", "2", "--eval", str(calib_file), "--eval-seq-len", "16", "--eval-seq-len", "64", "--json"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    by_length = json.loads(r.stdout)["eval"]["by_length"]
    assert [e["seq_len"] for e in by_length] == [16, 64]
    short, long = by_length
    assert short["before"] == pytest.approx(short["after"], rel=1e-6)  # window 16 covers a 16-token context
    assert long["before"] != pytest.approx(long["after"], rel=1e-6)
    md = CliRunner().invoke(app, ["report", str(out)]).stdout
    assert "perplexity @16" in md and "perplexity @64" in md and "window 16 + 2 sinks" in md
    page = CliRunner().invoke(app, ["report", str(out), "--format", "html"]).stdout
    assert "<h2>attention sinks window 16 + 2 sinks</h2>" in page and "Pruning" not in page  # one section, its pass
    assert "Perplexity by context length" in page
    ev = CliRunner().invoke(app, ["eval", str(out), "--data", str(calib_file), "--seq-len", "16", "--seq-len", "64"])
    assert ev.exit_code == 0 and sum(line.startswith("perplexity") for line in ev.stdout.splitlines()) == 2
    assert "KL to reference" in ev.stdout  # the input recorded in the report
    assert f"{long['after']:.3f}" in ev.stdout  # eval loads through sparsify.load: the pattern is active


def test_prune_then_sinks_in_one_recipe(model_dir, tmp_path):
    recipe = parse_recipe(
        {
            "calibration": {"samples": 4, "seq_len": 32},
            "passes": [
                {"type": "prune", "method": "sparsegpt", "pattern": "2:4"},
                {"type": "attention", "pattern": "sinks", "window": 8, "sinks": 2},
            ],
        }
    )
    compress(model_dir("qwen2"), recipe, tmp_path / "out")
    model = sparsify.load(tmp_path / "out").eval()
    assert model.config._attn_implementation == "sparsify"
    weight = model.model.layers[1].mlp.down_proj.weight  # (out, in): 2 zeros in every 4 inputs
    assert ((weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1) >= 2).all()
    assert torch.isfinite(_out(model)).all()


def test_a_patterned_checkpoint_can_be_pruned_inspected_and_swapped_again(model_dir, tmp_path):
    _swap(model_dir("llama"), tmp_path / "sinks", pattern="sinks", window=8, sinks=2)
    runner = CliRunner()
    info = runner.invoke(app, ["inspect", str(tmp_path / "sinks"), "--json"])
    assert json.loads(info.stdout)["attention"].startswith("sparsify patterns (2 sinks of 2 layers)")
    pruned = runner.invoke(
        app, ["prune", str(tmp_path / "sinks"), "-o", str(tmp_path / "pruned"), "--sparsity", "0.5", "--samples", "2"]
    )
    assert pruned.exit_code == 0, pruned.output
    model = sparsify.load(tmp_path / "pruned").eval()
    assert model.config._attn_implementation == "sparsify" and torch.isfinite(_out(model)).all()
    report = _swap(tmp_path / "sinks", tmp_path / "native", pattern="sliding-window", window=8)
    config = json.loads((tmp_path / "native" / "config.json").read_text())
    assert "sparsify_attention" not in config and "attn_implementation" not in config
    assert config["model_type"] == "mistral" and any("replaces" in n for n in report["notes"])


def _naive_attention(q, k, v, mask, scale: float) -> torch.Tensor:
    """Softmax attention with an explicit mask, key/value heads repeated for the query heads: (B, q, H, D)."""
    groups = q.shape[1] // k.shape[1]
    scores = (q @ k.repeat_interleave(groups, 1).transpose(-1, -2)) * scale  # (B, H, q, kv)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return (probs @ v.repeat_interleave(groups, 1)).transpose(1, 2)  # (B, q, H, D)


@pytest.mark.parametrize(("window", "sinks"), [(16, 0), (16, 4), (70, 3), (1, 2)])
@pytest.mark.parametrize(("q_len", "kv_len"), [(300, 300), (200, 260)])
@pytest.mark.parametrize("padded", [False, True])
def test_long_windowed_inputs_run_banded_and_equal_the_masked_maths(window, sinks, q_len, kv_len, padded):
    """Past two chunks the windowed path attends each chunk of queries to its sinks and band only; the
    result equals full masked attention (naive maths here), with a cache offset and with padding."""
    from types import SimpleNamespace

    from sparsify.runtime.attention import sparsify_attention_forward

    pattern = "sinks" if sinks else "sliding-window"
    spec = {"format": 1, "causal": True, "layers": [{"pattern": pattern, "window": window, "sinks": sinks}]}
    module = SimpleNamespace(config=SimpleNamespace(sparsify_attention=spec), layer_idx=0, num_key_value_groups=2)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, q_len, 8, generator=g)  # (B, H, q, D)
    k, v = torch.randn(2, 2, kv_len, 8, generator=g), torch.randn(2, 2, kv_len, 8, generator=g)  # (B, Hkv, kv, D)
    allowed = torch.ones(2, 1, q_len, kv_len, dtype=torch.bool)
    if padded:
        allowed[1, :, :, :5] = False  # row 1: five padding keys at the start
    got, _ = sparsify_attention_forward(module, q, k, v, allowed if padded else None, scaling=8**-0.5)

    mask = pattern_mask(LayerPattern(pattern, window=window, sinks=sinks), q_len, kv_len) & allowed  # (B, 1, q, kv)
    real = mask.any(-1).squeeze(1)  # (B, q): queries with something to attend (padding queries are garbage)
    ref = _naive_attention(q, k, v, mask, 8**-0.5)
    torch.testing.assert_close(got[real], ref[real], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(got).all()


def test_banded_prefill_in_a_model_and_decoding_after_it(model_dir, tmp_path):
    """A 160-token input with a window of 8 goes through the banded path in every layer; it equals the
    dense model fed the pattern's mask, and decoding after a long prompt equals recomputing."""
    _swap(model_dir("qwen2"), tmp_path / "out", pattern="sinks", window=8, sinks=2)
    model = sparsify.load(tmp_path / "out").eval()
    ids = torch.randint(3, zoo.VOCAB, (2, 160), generator=torch.Generator().manual_seed(1))
    expected = _masked_reference(_dense(model_dir("qwen2")), LayerPattern("sinks", window=8, sinks=2), True, ids)
    torch.testing.assert_close(_out(model, ids), expected, rtol=1e-5, atol=1e-5)
    assert_decoding_equals_recomputing(model, ids[:1, :140], 12)


@pytest.mark.parametrize(
    ("p", "causal"),
    [
        (LayerPattern("sinks", window=24, sinks=3), True),
        (LayerPattern("block-sparse", block_size=16, global_blocks=1, random_blocks=2, seed=5), True),
        (LayerPattern("block-sparse", block_size=16, global_blocks=1, random_blocks=1, seed=2), False),
        (LayerPattern("local", window=33), False),
    ],
)
@pytest.mark.parametrize("padded", [False, True])
def test_flex_attention_block_masks_equal_the_mask_path(p, causal, padded):
    """On CUDA long inputs go through flex_attention with the pattern's rule as mask_mod; run unfused on CPU
    here, it must give the mask path's result (the GPU speed itself is not measured in this project yet)."""
    import warnings

    from sparsify.algorithms.attention_masks import pattern_rule
    from sparsify.runtime.attention import _flex

    q_len, kv_len = (150, 200) if causal else (200, 200)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, q_len, 16, generator=g)
    k, v = torch.randn(2, 2, kv_len, 16, generator=g), torch.randn(2, 2, kv_len, 16, generator=g)
    allowed = torch.ones(2, 1, q_len, kv_len, dtype=torch.bool)
    if padded:
        allowed[1, ..., :7] = False
    mask = pattern_mask(p, q_len, kv_len, causal) & allowed  # (B, 1, q, kv)
    ref = _naive_attention(q, k, v, mask, 0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()": expected on CPU
        got, _ = _flex(
            q, k, v, pattern_rule(p, q_len, kv_len, causal), kv_len - q_len, allowed if padded else None, 0.25, False
        )
    real = mask.any(-1).squeeze(1)  # (B, q)
    torch.testing.assert_close(got[real], ref[real], rtol=1e-5, atol=1e-5)
