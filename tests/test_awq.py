"""AWQ and the equalizer registry: the scale search against a naive reference; never worse than plain rounding and
much better where the inputs have salient channels; folding keeps the float layer's function for every pair of the
table (norm -> q/k/v, v -> o, norm -> gate/up, up -> down); the pass folds, notes and refuses as it says."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from sparsify.algorithms.awq import awq_search
from sparsify.algorithms.quant import PerGroup, QuantArgs, dequantize, observe, qparams, quantize
from sparsify.arch import lookup
from sparsify.errors import SparsifyError
from sparsify.passes import equalizers
from sparsify.recipe import parse_recipe
from tests import zoo
from tests.zoo import compress

ARGS = QuantArgs(4, True, PerGroup(8))


def _rtn(W: torch.Tensor) -> torch.Tensor:
    scale, zp = qparams(*observe(W, ARGS, "minmax"), ARGS)
    return dequantize(quantize(W, scale, zp, ARGS), scale, zp, ARGS)


def _naive(X, weights, grid):
    """The search written out channel by channel and row by row (float64)."""
    X = X.double()
    n, d = X.shape
    x_mean = torch.tensor([sum(abs(float(X[t, c])) for t in range(n)) / n for c in range(d)], dtype=torch.float64)
    rows = []  # each group of 8 along a row divided by its largest |w|
    for w in weights:
        for r in range(w.shape[0]):
            a = w.double().abs()[r]
            rows.append(torch.cat([a[k : k + 8] / a[k : k + 8].max() for k in range(0, d, 8)]))
    w_mean = torch.stack(rows).mean(0)

    def error(s):
        total = 0.0
        for W in weights:
            Wq = _rtn((W.double() * s).float()).double() / s
            total += float(((X @ Wq.T) - (X @ W.double().T)).pow(2).sum())
        return total

    best_s, best_e = torch.ones(d, dtype=torch.float64), error(torch.ones(d, dtype=torch.float64))
    for i in range(grid):
        r = i / grid
        s = torch.tensor([max(float(x_mean[c]) ** r / max(float(w_mean[c]) ** (1 - r), 1e-4), 1e-4) for c in range(d)])
        s = s.double() / (s.max() * s.min()).sqrt()
        e = error(s)
        if e < best_e:
            best_s, best_e = s, e
    return best_s, best_e


def _data(seed: int, salient: bool):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(64, 16, generator=g)  # (n, in)
    if salient:
        X[:, 3] *= 20  # a salient channel: AWQ's case
        X[:, 11] *= 8
    weights = [torch.randn(8, 16, generator=g), torch.randn(12, 16, generator=g)]
    return X, weights


@pytest.mark.parametrize("seed", [0, 1])
def test_the_search_equals_the_naive_reference(seed):
    X, weights = _data(seed, salient=True)
    got = awq_search(X, weights, _rtn, grid=10, group=8)
    want_s, want_e = _naive(X, weights, 10)
    torch.testing.assert_close(got.scales.double(), want_s, rtol=1e-4, atol=1e-6)
    assert got.error == pytest.approx(want_e, rel=1e-2)  # float32 products vs float64: a level may differ


def test_never_worse_than_plain_rounding_and_much_better_on_salient_channels():
    gains = []
    for seed in range(6):
        X, weights = _data(seed, salient=False)
        found = awq_search(X, weights, _rtn, group=8)
        assert found.error <= found.plain_error
        X, weights = _data(seed, salient=True)
        found = awq_search(X, weights, _rtn, group=8)
        assert found.ratio is not None and found.error < found.plain_error
        gains.append(found.error / found.plain_error)
    assert sum(gains) / len(gains) < 0.7  # about 0.6 here: the salient channels' weights rounded more finely


def _mha_llama(tmp_path_factory=None):
    """A tiny Llama without grouped KV heads (so v_proj -> o_proj is a pair too)."""
    config = T.LlamaConfig(**{**zoo._COMMON, "num_key_value_heads": 4}, **zoo._IDS)
    torch.manual_seed(0)
    return T.LlamaForCausalLM(config).eval()


def test_folding_keeps_every_pairs_function():
    model = _mha_llama()
    layer, arch = model.model.layers[0], lookup("llama")
    x = torch.randn(2, 10, 64)
    pos = torch.arange(10)[None].expand(2, -1)
    emb = model.model.rotary_emb(x, pos)
    with torch.no_grad():
        before = layer(x, position_embeddings=emb)
        before = before[0] if isinstance(before, tuple) else before
        pairs = equalizers.pairs(arch, linear_pairs=True)
        assert [p.producer for p in pairs] == [
            "input_layernorm", "post_attention_layernorm", "self_attn.v_proj", "mlp.up_proj",
        ]  # fmt: skip
        for i, pair in enumerate(pairs):
            assert equalizers.fits(layer, pair)
            width = layer.get_submodule(pair.consumers[0]).weight.shape[1]
            s = torch.rand(width, generator=torch.Generator().manual_seed(i)) * 4 + 0.25  # (in,)
            equalizers.fold(layer, pair, s, arch.norm_offset)
        after = layer(x, position_embeddings=emb)
        after = after[0] if isinstance(after, tuple) else after
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_grouped_kv_heads_skip_v_to_o_and_say_so(model_dir, tmp_path):
    step = {"type": "quantize", "scheme": "w4a16", "method": "rtn", "awq": {"grid": 4}}
    recipe = parse_recipe({"calibration": {"samples": 8, "seq_len": 32}, "passes": [step]})
    report = compress(model_dir("llama"), recipe, tmp_path / "out")  # zoo's llama: 4 heads, 2 KV heads
    notes = " ".join(report["notes"])
    assert "AWQ scales folded into input_layernorm, mlp.up_proj, post_attention_layernorm" in notes
    assert "no scales between self_attn.v_proj -> self_attn.o_proj" in notes and "grouped KV heads" in notes
    assert report["passes"][0]["description"].endswith("+ AWQ")


def test_awq_is_for_weight_only_and_pre_norm_families(model_dir, tmp_path):
    step = {"type": "quantize", "scheme": "w8a8", "awq": {}}
    with pytest.raises(SparsifyError, match="awq protects salient weights of weight-only schemes"):
        parse_recipe({"passes": [step]})
    step = {"type": "quantize", "scheme": "w4a16", "smoothquant": 0.5}
    with pytest.raises(SparsifyError, match="smoothquant moves activation outliers"):
        parse_recipe({"passes": [step]})
    bert = parse_recipe({"calibration": {"samples": 4, "seq_len": 32},
                         "passes": [{"type": "quantize", "scheme": "w4a16", "awq": {}}]})  # fmt: skip
    with pytest.raises(SparsifyError, match="AWQ cannot fold scales into bert's norms"):
        compress(model_dir("bert"), bert, tmp_path / "bert")


def test_awq_with_sequential_stages_is_refused():
    step = {"type": "quantize", "scheme": "w4a16", "awq": {}, "sequential": True}
    with pytest.raises(SparsifyError, match="awq folds scales from a Linear into the next"):
        parse_recipe({"passes": [step]})
