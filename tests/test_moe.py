"""Dense → MoE end to end: native Mixtral / Qwen2-MoE / Qwen3-MoE checkpoints that plain transformers loads; with
k = all routed experts they equal the dense model; reload equals memory; routing is the plain sum of the selected
experts; refusals."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import transformers as T
from safetensors import safe_open

from sparsify.errors import SparsifyError
from sparsify.passes.moe import MoEBlock
from sparsify.pipeline import compress_model
from sparsify.recipe import parse_recipe
from sparsify.runtime.quantized import QuantizedLinear
from tests import zoo
from tests.test_cli import run
from tests.test_quantize import _tokens
from tests.zoo import compress

CALIB = {"samples": 8, "seq_len": 32, "batch_size": 4}
IDS = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def _recipe(**step):
    return parse_recipe({"calibration": CALIB, "passes": [{"type": "moe", **step}]})


def _logits(path_or_model) -> torch.Tensor:
    model = path_or_model
    if not isinstance(model, torch.nn.Module):
        model = T.AutoModelForCausalLM.from_pretrained(path_or_model, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


CASES = [  # family, shared, native type
    ("llama", 0, "mixtral"),
    ("llama", 1, "qwen2_moe"),
    ("mistral", 0, "mixtral"),
    ("mistral", 1, "qwen2_moe"),
    ("qwen2", 0, "qwen2_moe"),
    ("qwen2", 1, "qwen2_moe"),
    ("qwen3", 0, "qwen3_moe"),
    ("llama3", 0, "mixtral"),
    ("llama3", 1, "qwen2_moe"),
]


@pytest.mark.parametrize(("family", "shared", "native"), CASES)
@pytest.mark.parametrize(("split", "router"), [("cluster", "centroid"), ("coactivation", "analytic")])
def test_k_equal_to_all_experts_reproduces_the_dense_model(family, shared, native, split, router, model_dir, tmp_path):
    src = zoo.save_llama3(tmp_path / "llama3") if family == "llama3" else model_dir(family)
    experts = 4
    out = tmp_path / "out"
    report = compress(
        src, _recipe(experts=experts, top_k=experts - shared, shared=shared, split=split, router=router), out
    )
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == native
    dense_cfg = T.AutoConfig.from_pretrained(src)
    assert cfg["rope_parameters"] == dense_cfg.rope_parameters  # carried, not the family's default
    with warnings.catch_warnings():  # Qwen2-MoE without shared experts: torch notes its zero-width one
        warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op", UserWarning)
        model = T.AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no sparsify
    assert type(model).__name__.lower().startswith(native.replace("_", ""))
    assert _rel(_logits(model), _logits(src)) < 1e-4
    assert report["totals"]["moe_layers"] == 2 and report["totals"]["ffn_active"] == 1.0


@pytest.mark.parametrize(("family", "shared"), [("llama", 0), ("llama", 1), ("qwen3", 0)])
def test_fewer_experts_reload_equals_memory_and_is_the_sum_of_the_selected_experts(family, shared, model_dir, tmp_path):
    src, out = model_dir(family), tmp_path / "out"
    recipe = _recipe(experts=4, top_k=1, shared=shared, split="coactivation", router="analytic")
    compress(src, recipe, out)
    memory = T.AutoModelForCausalLM.from_pretrained(src).eval()
    compress_model(memory, recipe, _tokens(src))
    torch.testing.assert_close(_logits(out), _logits(memory), rtol=0, atol=1e-5)
    assert 0.01 < _rel(_logits(out), _logits(src)) < 1.0  # it is a different, sparser model

    block = next(m for m in memory.modules() if isinstance(m, MoEBlock))
    x = torch.randn(64, block.gate.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        chosen = torch.topk(x @ block.gate.weight.T, block.top_k, dim=1).indices  # (T, k)
        naive = torch.stack([sum(block.experts[int(e)](x[t]) / block.top_k for e in chosen[t]) for t in range(64)])
        if shared:
            naive = naive + block.shared_expert(x) / 2  # its down projection is doubled for sigmoid(0) = 1/2
        torch.testing.assert_close(block(x), naive, rtol=2e-3, atol=1e-6)  # flat to 1e-3: the plain sum


def test_written_in_the_published_layout(model_dir, tmp_path):
    compress(model_dir("llama"), _recipe(experts=4, top_k=2), tmp_path / "mixtral")
    compress(model_dir("llama"), _recipe(experts=4, top_k=2, shared=1), tmp_path / "qwen")
    with safe_open(tmp_path / "mixtral" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert {
        "model.layers.0.block_sparse_moe.gate.weight",
        "model.layers.1.block_sparse_moe.experts.3.w2.weight",
    } <= keys
    assert not any(".mlp." in k for k in keys)
    with safe_open(tmp_path / "qwen" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.layers.0.mlp.experts.2.gate_proj.weight").get_shape() == [32, 64]
    assert {"model.layers.0.mlp.shared_expert.down_proj.weight", "model.layers.0.mlp.shared_expert_gate.weight"} <= keys


def test_routers_and_splits(model_dir, tmp_path):
    """Every split and router runs; a router fitted to the activations recalls the true top-k better than chance."""
    src = model_dir("llama")
    recalls = {}
    for split in ("cluster", "coactivation", "random"):
        for router in ("centroid", "analytic", "trained"):
            step = {"experts": 4, "top_k": 1, "split": split, "router": router}
            step.update({"router_steps": 50} if router == "trained" else {})
            report = compress(src, _recipe(**step), tmp_path / f"{split}-{router}")
            recalls[split, router] = report["totals"]["router_recall"]
    assert all(0 <= r <= 1 for r in recalls.values())
    assert recalls["coactivation", "analytic"] > 0.25 + 0.1  # 1 of 4 at random
    assert recalls["coactivation", "trained"] >= recalls["coactivation", "analytic"] - 0.05


@pytest.mark.parametrize(("experts", "eager"), [(64, True), (16, False)])
def test_narrow_experts_run_in_plain_transformers(experts, eager, model_dir, tmp_path):
    """transformers' default experts (torch grouped_mm) need 16-byte row strides: experts 128 / 64 = 2 wide fail
    with it, in float32 and bfloat16 alike. Such a config names the eager experts, which transformers reads from
    config.json; 8 wide keeps the default. With k = all experts the model is the dense one."""
    src, out = model_dir("llama"), tmp_path / "moe"
    report = compress(src, _recipe(experts=experts, top_k=experts), out)
    assert json.loads((out / "config.json").read_text()).get("experts_implementation") == ("eager" if eager else None)
    assert any("grouped_mm" in n for n in report["notes"]) == eager
    assert _rel(_logits(out), _logits(src)) < 1e-4
    with torch.no_grad():
        T.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)(input_ids=IDS)


def test_asymmetric_experts_say_transformers_cannot_load_them(model_dir, tmp_path):
    """transformers 5.24 decompresses fused experts without their zero point (an upstream bug): the run says so in
    one line and sparsify.load runs the checkpoint; symmetric experts (tested above) and dense Linears load."""
    src, out = model_dir("llama"), tmp_path / "mq"
    recipe = parse_recipe({"calibration": CALIB, "passes": [{"type": "moe", "experts": 4, "top_k": 4},
                                                            {"type": "quantize", "scheme": "w4a16", "method": "rtn",
                                                             "group_size": 32, "symmetric": False}]})  # fmt: skip
    report = compress(src, recipe, out)
    assert [n for n in report["notes"] if "transformers 5 cannot load" in n and "MoE experts" in n]
    import sparsify

    assert _rel(_logits(sparsify.load(out)), _logits(src)) < 0.1
    with pytest.raises(RuntimeError):
        T.AutoModelForCausalLM.from_pretrained(out)


def test_moe_then_quantize_and_prune_then_moe(model_dir, tmp_path):
    src = model_dir("llama")
    both = parse_recipe({"calibration": CALIB, "passes": [{"type": "moe", "experts": 4, "top_k": 4},
                                                          {"type": "quantize", "scheme": "w8a16", "method": "rtn"}]})  # fmt: skip
    report = compress(src, both, tmp_path / "mq")
    assert report["totals"]["quantized_linears"] == 2 * (4 + 4 * 3)  # attention + every expert's 3 Linears
    ignore = json.loads((tmp_path / "mq" / "config.json").read_text())["quantization_config"]["ignore"]
    assert "model.layers.0.mlp.gate" in ignore and "lm_head" in ignore  # routers stay float
    import sparsify

    model = sparsify.load(tmp_path / "mq")  # its experts one Linear each, as stored
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 2 * (4 + 4 * 3)
    assert _rel(_logits(model), _logits(src)) < 0.05
    torch.testing.assert_close(_logits(tmp_path / "mq"), _logits(model), rtol=0, atol=1e-4)  # transformers fuses them

    pruned = parse_recipe({"calibration": CALIB, "passes": [{"type": "prune", "method": "wanda", "sparsity": 0.5},
                                                            {"type": "moe", "experts": 4, "top_k": 4}]})  # fmt: skip
    compress(src, pruned, tmp_path / "pm")
    memory = T.AutoModelForCausalLM.from_pretrained(src).eval()
    compress_model(memory, pruned, _tokens(src))
    torch.testing.assert_close(_logits(tmp_path / "pm"), _logits(memory), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("family", "step", "message"),
    [
        ("llama", {"experts": 5, "top_k": 2}, "does not divide intermediate_size 128"),
        ("llama", {"experts": 4, "top_k": 5}, "top_k 5 is more than the 4 routed"),
        ("llama", {"experts": 4, "top_k": 0}, "top_k"),
        ("llama", {"experts": 4}, r"top_k 6 \(the default\) is more than the 4 routed"),
        ("llama", {"experts": 4, "shared": 4}, "must be fewer than experts"),
        ("llama", {"experts": 4, "shared": 1, "top_k": 4}, "routed"),
        ("qwen3", {"experts": 4, "shared": 1, "top_k": 2}, "no shared experts"),
        ("gemma", {"experts": 4, "top_k": 2}, "no native MoE counterpart"),
        ("gpt2", {"experts": 4, "top_k": 2}, "no native MoE counterpart"),
        ("bert", {"experts": 4, "top_k": 2}, "no native MoE counterpart"),
    ],
)
def test_bad_settings_are_refused_before_any_work(family, step, message, model_dir, tmp_path):
    with pytest.raises(SparsifyError, match=message):
        compress(model_dir(family), _recipe(**step), tmp_path / "out")
    assert not list(tmp_path.iterdir())


def test_cli_moe_convert(model_dir, tmp_path):
    base = ["moe-convert", model_dir("llama"), "--samples", "8", "--seq-len", "32"]
    bad = run(*base, "-o", tmp_path / "bad", "--experts", "3", "--top-k", "2")
    assert bad.exit_code == 1 and len(bad.stderr.strip().splitlines()) == 1 and "does not divide" in bad.stderr
    default_k = run(*base, "-o", tmp_path / "bad", "--experts", "4")
    assert (
        default_k.exit_code == 2
        and default_k.stderr == "error: --top-k 6 (the default) is more than the 4 routed experts (experts - shared)\n"
    )
    assert not (tmp_path / "bad").exists()
    ok = run(*base, "-o", tmp_path / "ok", "--experts", "4", "--top-k", "2", "--json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["totals"]["ffn_active"] == 0.5
    assert "moe 4 experts, top-2" in (tmp_path / "ok" / "README.md").read_text()
