"""Every routed expert calibrated (sparsify.calibration.experts): MoE models whose router never sends a token to
one expert compress to the end, the starved expert's weights pruned / rounded, the report naming it; in ``fill``
mode the expert is calibrated on its layer's tokens while the layer's output stays the routed one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

from sparsify.calibration.experts import ExpertCalibration, expert_slots
from sparsify.calibration.gather import gather_stats
from sparsify.calibration.work import run_layer
from sparsify.pipeline import compress_model
from sparsify.recipe import parse_recipe
from sparsify.runtime.moe import MoEBlock, per_expert_blocks
from sparsify.runtime.quantized import QuantizedLinear
from tests import zoo
from tests.test_distributed import _both, _tensors
from tests.zoo import compress

STARVED = 3
CALIB = {"samples": 8, "seq_len": 32, "batch_size": 2}  # several batches: an expert may first run in a later one
_COMMON = dict(zoo._COMMON, **zoo._IDS)
NATIVE = {
    "mixtral": lambda: T.MixtralConfig(**_COMMON, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(
        **_COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64
    ),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(
        **_COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16
    ),
}


def _starve(router: torch.Tensor) -> None:
    """Router rows ``(E, d)`` under which expert STARVED never reaches the top 2: experts 0/1 and 2/4 score
    ``±10 u·h`` and ``±10 v·h``, so two logits are positive for every token, and STARVED's is 0."""
    g = torch.Generator().manual_seed(1)
    u, v = torch.randn(router.shape[1], generator=g), torch.randn(router.shape[1], generator=g)
    router[0], router[1], router[2], router[4] = 10 * u, -10 * u, 10 * v, -10 * v
    router[STARVED] = 0


def _native(kind: str, folder: Path) -> Path:
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(NATIVE[kind]()).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            _starve(layer.mlp.gate.weight)
    model.save_pretrained(folder)
    zoo.tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = _native(kind, tmp_path_factory.mktemp(kind))
        return made[kind]

    return get


@pytest.fixture(scope="module")
def converted(model_dir, tmp_path_factory):
    """Our own moe-convert output (Mixtral, 8 experts, top 2) with the same starved router."""
    out = tmp_path_factory.mktemp("converted") / "moe"
    compress(model_dir("llama"), parse_recipe({"calibration": CALIB, "passes": [
        {"type": "moe", "experts": 8, "top_k": 2}]}), out)  # fmt: skip
    weights = load_file(str(out / "model.safetensors"))
    for name, t in weights.items():
        if name.endswith("block_sparse_moe.gate.weight"):
            _starve(t)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _recipe(step: dict, **calibration) -> object:
    return parse_recipe({"calibration": {**CALIB, **calibration}, "passes": [step]})


def _routed_counts(path: Path) -> dict[int, int]:
    """Tokens the router of layer 0 sends each expert on random ids (the premise: STARVED gets none)."""
    model = T.AutoModelForCausalLM.from_pretrained(path).eval()
    mlp = model.model.layers[0].mlp
    seen: list[torch.Tensor] = []
    handle = mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(input_ids=torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0)))
    handle.remove()
    h = seen[0].reshape(-1, seen[0].shape[-1])  # (N, d)
    chosen = (h @ mlp.gate.weight.T).topk(2, dim=-1).indices  # (N, 2)
    return {e: int((chosen == e).sum()) for e in range(mlp.gate.weight.shape[0])}


def _in_memory() -> torch.nn.Module:
    """A tiny Mixtral with sparsify's per-expert blocks, STARVED's router row set (for in-memory runs)."""
    config = NATIVE["mixtral"]()
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    assert per_expert_blocks(model, config) == config.num_hidden_layers
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.to_empty(device="cpu")
            for p in layer.mlp.parameters():
                p.normal_(0, 0.05)
            _starve(layer.mlp.gate.weight)
    return model


STEPS = {
    "wanda": {"type": "prune", "method": "wanda", "sparsity": 0.5},
    "sparsegpt": {"type": "prune", "method": "sparsegpt", "pattern": "2:4"},
    "gptq": {"type": "quantize", "scheme": "w4a16", "method": "gptq", "group_size": 32},
    "rtn-weighted-mse": {
        "type": "quantize",
        "scheme": "w4a16",
        "method": "rtn",
        "group_size": 32,
        "weight_observer": "weighted-mse",
    },
    "w8a8-static": {"type": "quantize", "scheme": "w8a8-static", "method": "rtn"},
}


def _stored(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("mode", ["routed", "fill"])
def test_a_starved_expert_is_compressed_and_named(native, step, mode, tmp_path):
    src, out = native("mixtral"), tmp_path / "out"
    assert _routed_counts(src)[STARVED] == 0 and sum(_routed_counts(src).values()) > 0
    report = compress(src, _recipe(STEPS[step], expert_calibration=mode), out)  # completes: no "saw no tokens"
    rows = [
        r for r in report["layers"] if f".experts.{STARVED}." in r["name"] and r["name"].startswith("model.layers.0")
    ]
    assert rows and all(r["status"] in ("pruned", "quantized") for r in rows)
    word = "none: " if mode == "routed" else "all tokens (0 routed)"
    assert all(str(r.get("calibrated_on", "")).startswith(word) for r in rows), rows
    assert any(f"model.layers.0.mlp.experts.{STARVED}" in n and "routed expert" in n for n in report["notes"])
    stored = _stored(out)
    prefix = f"model.layers.0.block_sparse_moe.experts.{STARVED}.w1"
    if STEPS[step]["type"] == "prune":
        assert float((stored[f"{prefix}.weight"] == 0).float().mean()) == pytest.approx(0.5)
    else:  # stored as compressed-tensors integers with their scales
        assert f"{prefix}.weight_scale" in stored
    if step != "w8a8-static":  # transformers cannot fuse W8A8 experts (the run says so; sparsify.load checked it)
        T.AutoModelForCausalLM.from_pretrained(out)
    else:
        assert any("transformers 5 cannot load" in n for n in report["notes"])


@pytest.mark.parametrize("kind", ["qwen2_moe", "qwen3_moe", "converted"])
def test_other_moe_families_and_our_own_outputs(native, converted, kind, tmp_path):
    src = converted if kind == "converted" else native(kind)
    assert _routed_counts(src)[STARVED] == 0
    report = compress(src, _recipe({**STEPS["gptq"], "group_size": 16}), tmp_path / "out")
    assert any(f"experts.{STARVED}" in n for n in report["notes"])
    T.AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_heal_after_a_starved_expert(native, tmp_path):
    recipe = parse_recipe({"calibration": CALIB, "passes": [STEPS["wanda"], {"type": "heal", "steps": 4}]})
    report = compress(native("mixtral"), recipe, tmp_path / "out")
    assert any(f"experts.{STARVED}" in n for n in report["notes"])
    T.AutoModelForCausalLM.from_pretrained(tmp_path / "out")


class _Layer(torch.nn.Module):
    def __init__(self, mlp: MoEBlock):
        super().__init__()
        self.mlp = mlp

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(h)


def test_fill_gives_the_starved_expert_every_token_and_keeps_the_routed_output(native):
    layer = _Layer(_in_memory().model.layers[0].mlp)
    g = torch.Generator().manual_seed(0)
    hidden, calls = [torch.randn(2, 16, 64, generator=g) for _ in range(2)], [((), {})] * 2
    targets = {f"l.{n}": m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear) and ".experts." in n}
    routed_out = run_layer(layer, hidden, calls)
    outs: list[torch.Tensor] = []
    fill = gather_stats(layer, targets, {"sq_norm"}, hidden, calls, torch.device("cpu"), outputs=outs,
                        experts=ExpertCalibration("fill", 10_000))  # fmt: skip
    for a, b in zip(outs, routed_out, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the layer's output is the routed one
    every = gather_stats(layer, targets, {"sq_norm"}, hidden, calls, torch.device("cpu"),
                         experts=ExpertCalibration("all"))  # fmt: skip
    routed = gather_stats(layer, targets, {"sq_norm"}, hidden, calls, torch.device("cpu"),
                          experts=ExpertCalibration("routed"))  # fmt: skip
    name = f"l.mlp.experts.{STARVED}.w1"
    n_tokens = sum(h.shape[0] * h.shape[1] for h in hidden)
    assert routed[name].tokens == 0 and fill[name].tokens == every[name].tokens == n_tokens
    assert fill[name].routed == 0 and every[name].routed is None
    torch.testing.assert_close(fill[name]["sq_norm"], every[name]["sq_norm"])
    # an expert that was routed some tokens: fill (min 1) keeps its routed statistics
    kept = gather_stats(layer, targets, {"sq_norm"}, hidden, calls, torch.device("cpu"),
                        experts=ExpertCalibration("fill", 1))  # fmt: skip
    busy = "l.mlp.experts.0.w1"
    assert kept[busy].tokens == routed[busy].tokens > 0 and kept[busy].routed is None
    torch.testing.assert_close(kept[busy]["sq_norm"], routed[busy]["sq_norm"])
    assert set(expert_slots(layer, targets)) == set(targets)


def test_w8a8_static_on_a_starved_expert_in_memory_borrows_its_peers_scale():
    """In memory (no checkpoint to load): the routed mode's starved expert takes the largest input scale of the
    other experts' same projection."""
    model = _in_memory()
    tokens = torch.randint(3, 300, (8, 32), generator=torch.Generator().manual_seed(0))
    compress_model(model, _recipe(STEPS["w8a8-static"], expert_calibration="routed"), tokens)
    experts = model.model.layers[0].mlp.experts
    starved, peers = experts[STARVED].w1, [experts[e].w1 for e in range(8) if e != STARVED]
    assert isinstance(starved, QuantizedLinear)
    assert float(starved.input_scale) == max(float(p.input_scale) for p in peers)


def test_bad_expert_settings_are_refused():
    from sparsify.errors import SparsifyError

    with pytest.raises(SparsifyError, match="expert_min_tokens applies with expert_calibration: fill"):
        _recipe(STEPS["wanda"], expert_calibration="routed", expert_min_tokens=5)
    with pytest.raises(SparsifyError, match="expert_calibration"):
        _recipe(STEPS["wanda"], expert_calibration="some")


@pytest.mark.slow
def test_two_ranks_widen_the_experts_one_process_widens(native, tmp_path):
    one, two, r1, r2 = _both(tmp_path, "prune", native("mixtral"), "--method", "wanda", "--sparsity", "0.5",
                             "--expert-min-tokens", "64")  # fmt: skip
    a, b = _tensors(one), _tensors(two)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    widened = [r["name"] for r in r1["layers"] if r.get("calibrated_on")]
    assert widened and widened == [r["name"] for r in r2["layers"] if r.get("calibrated_on")]
    assert json.dumps(r1["notes"]).count("routed expert") == json.dumps(r2["notes"]).count("routed expert") >= 1
