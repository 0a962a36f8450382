"""A bit budget on ``quantize`` (``target_bpw`` / ``target_size``): int4 or int8 per Linear by a layer-wise Fisher;
the layer-wise Fisher equals the whole model's; bytes predicted = bytes written; the mixed checkpoint loads in
transformers with sparsify's logits; more bytes, less predicted damage; a resumed plan is the saved one; refusals."""

from __future__ import annotations

import json
import signal

import pytest
import torch
import transformers as T
from safetensors import safe_open

import sparsify
from sparsify.calibration import LayerwiseRunner
from sparsify.calibration.fisher import layer_fisher, linear_hook
from sparsify.calibration.work import InMemoryLayers
from sparsify.checkpoint.stage_model import Layers
from sparsify.data import load_text, sample_windows, tokenize
from sparsify.errors import SparsifyError
from sparsify.evaluate import load_tokenizer
from sparsify.recipe import parse_recipe
from tests import zoo
from tests.test_cli import CALIB as CLI_CALIB
from tests.test_cli import assert_user_error, run
from tests.zoo import compress

CALIB = {"samples": 8, "seq_len": 32, "batch_size": 4}
STEP = {"type": "quantize", "scheme": "w4a16", "method": "rtn"}


def _recipe(**extra):
    return parse_recipe({"calibration": CALIB, "passes": [{**STEP, **extra}]})


def _bits(report) -> dict[str, int]:
    return {r["name"]: r["bits"] for r in report["layers"] if r.get("kind") == "quantize"}


def _target_bytes(folder, names) -> int:
    """Bytes of the quantized Linears' weight tensors (codes, scales, zero points, shapes) in the written file."""
    total = 0
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for key in f.keys():
            if key.rpartition(".")[0] in names and not key.endswith(".bias"):
                t = f.get_tensor(key)
                total += t.numel() * t.element_size()
    return total


def _tensor_bytes(folder) -> int:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())


def test_layer_fisher_equals_the_whole_models(model_dir):
    """The backward sweep layer by layer gives the Fisher the whole model's backward pass gives (same windows)."""
    src = model_dir("llama")
    model = T.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = sample_windows(tokenize(load_text(None), load_tokenizer(src)), 8, 32, 0)  # (8, 32)
    layers = Layers.of(model)
    runner = LayerwiseRunner(model.base_model, layers.modules, InMemoryLayers(layers.modules), ids, 4)

    def targets(i, layer):
        prefix = runner.prefix(i)
        return {f"{prefix}.{n}": m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}

    got = layer_fisher(runner, model, targets, windows=6)  # batches of 2, 4, 2 windows: the first two
    fisher, hooks = {}, []
    for i, layer in enumerate(layers.modules):
        for fqn, m in targets(i, layer).items():
            hooks.append(m.register_forward_hook(linear_hook(fisher, fqn, m.weight.shape)))
    model.requires_grad_(False)
    x = ids[:6]
    model.get_input_embeddings().weight.requires_grad_(True)  # so the backward pass runs through the layers
    logits = model(input_ids=x).logits.float()
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum").backward()
    for h in hooks:
        h.remove()
    assert set(got) == set(fisher) and len(got) == 14
    for name, f in fisher.items():
        expect = f / x[:, 1:].numel()
        assert torch.allclose(got[name], expect, rtol=1e-4, atol=1e-12), name
        assert float(expect.sum()) > 0


def test_a_budget_mixes_int4_and_int8_and_the_bytes_are_the_predicted(model_dir, tmp_path):
    src = model_dir("llama")
    report = compress(src, _recipe(target_bpw=6.0), tmp_path / "out")
    bits = _bits(report)
    assert set(bits.values()) == {4, 8}, bits
    names = set(bits)
    written = _target_bytes(tmp_path / "out", names)
    params = sum(r["shape"][0] * r["shape"][1] for r in report["layers"] if r.get("kind") == "quantize")
    assert 8 * written / params <= 6.0
    assert 8 * written / params > 5.6  # the budget is spent: no more than one Linear's upgrade left over
    note = next(n for n in report["notes"] if "bit budget 6 bits per weight" in n)
    assert f"{8 * written / params:.3f} bits per weight" in note, note
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    groups = qc["config_groups"]
    assert len(groups) == 2
    by_bits = {g["weights"]["num_bits"]: set(g["targets"]) for g in groups.values()}
    assert by_bits[8] == {n for n, b in bits.items() if b == 8} and by_bits[4] == {n for n, b in bits.items() if b == 4}


def test_the_mixed_checkpoint_loads_in_transformers_with_sparsifys_logits(model_dir, tmp_path):
    src = model_dir("llama")
    compress(src, _recipe(target_bpw=6.0), tmp_path / "out")
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = sparsify.load(tmp_path / "out").eval()(input_ids=ids).logits
        theirs = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
        hf = theirs(input_ids=ids).logits
    assert torch.isfinite(hf).all()
    assert torch.allclose(ours.float(), hf.float(), atol=1e-4, rtol=1e-4)


def test_target_size_counts_every_tensor_of_the_checkpoint(model_dir, tmp_path):
    src = model_dir("llama")
    small = compress(src, _recipe(target_bpw=5.1), tmp_path / "small")  # float32 scales of g32: 5.02 the least
    full = _tensor_bytes(tmp_path / "small")
    asked = full + 3000  # room for a few int8 Linears beyond the smallest
    report = compress(src, _recipe(target_size=str(asked)), tmp_path / "sized")
    written = _tensor_bytes(tmp_path / "sized")
    assert written <= asked and written >= 0.99 * asked - 2000  # within one Linear's upgrade of the bytes asked
    assert sum(b == 8 for b in _bits(report).values()) > sum(b == 8 for b in _bits(small).values())
    note = next(n for n in report["notes"] if "bit budget" in n)
    assert "the checkpoint" in note


def test_more_bytes_less_predicted_damage_and_a_rerun_writes_the_same_bytes(model_dir, tmp_path):
    src = model_dir("llama")
    kls, int8 = [], []
    for bpw in (5.1, 6.0, 7.5):
        report = compress(src, _recipe(target_bpw=bpw), tmp_path / f"b{bpw}")
        note = next(n for n in report["notes"] if "bit budget" in n)
        kls.append(float(note.split("predicted KL to the float model ")[1].split()[0]))
        int8.append(sum(b == 8 for b in _bits(report).values()))
    assert kls[0] > kls[1] > kls[2] > 0 and int8[0] < int8[1] < int8[2]
    again = compress(src, _recipe(target_bpw=6.0), tmp_path / "again")
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (
        tmp_path / "b6.0" / "model.safetensors"
    ).read_bytes()
    assert again["passes"][0]["settings"]["target_bpw"] == 6.0


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--target-bpw", "3"], ["--target-bpw 3", "below the smallest", "every Linear int4"]),
        (["--target-bpw", "12"], ["--target-bpw 12", "above every Linear int8", "--scheme w8a16"]),
        (["--target-size", "5XB"], ["5XB"]),
        (["--target-size", "1KB"], ["--target-size 1KB", "below the smallest"]),
        (["--target-bpw", "5", "--target-size", "1MB"], ["two budgets"]),
        (["--target-bpw", "5", "--scheme", "w8a8"], ["w4a16", "w8a8"]),
    ],
)
def test_budgets_that_cannot_be_met_are_refused_in_one_line(model_dir, tmp_path, flags, fragments):
    out = tmp_path / "out"
    scheme = [] if "--scheme" in flags else ["--scheme", "w4a16"]
    result = run("quantize", model_dir("llama"), "-o", out, *scheme, "--method", "rtn", *flags, *CLI_CALIB, "--no-eval")
    assert_user_error(result, out, *fragments)


def test_a_budget_needs_calibration_data_and_a_language_model(model_dir, tmp_path):
    free = parse_recipe({"calibration": {"data": "none"}, "passes": [{**STEP, "target_bpw": 6.0}]})
    with pytest.raises(SparsifyError, match="needs calibration data"):
        compress(model_dir("llama"), free, tmp_path / "free")
    with pytest.raises(SparsifyError, match="bert is an encoder"):
        compress(model_dir("bert"), _recipe(target_bpw=6.0), tmp_path / "bert")
    assert not (tmp_path / "free").exists() and not (tmp_path / "bert").exists()


def test_a_resumed_run_takes_back_the_saved_choice_and_writes_the_same_bytes(model_dir, tmp_path, monkeypatch):
    """The budget's choice is a decision of the run: a run stopped after it resumes without measuring again."""
    from sparsify.interrupts import Interrupted
    from sparsify.passes import quantize, quantize_budget  # quantize reads quantize_budget.choose at run time
    from sparsify.pipeline import Options

    src = model_dir("llama")
    compress(src, _recipe(target_bpw=6.0), tmp_path / "plain")
    chosen, choose = [], quantize_budget.choose
    monkeypatch.setattr(quantize_budget, "choose", lambda *a: chosen.append(1) or choose(*a))
    original, calls = quantize.QuantizePass.compress_layer, []

    def compress_layer(self, work):
        calls.append(work.index)
        if len(calls) == 2:
            raise Interrupted(signal.SIGINT)  # stopped in the sweep, after layer 0 was saved
        return original(self, work)

    monkeypatch.setattr(quantize.QuantizePass, "compress_layer", compress_layer)
    opts = Options(evaluate=False, resume=True)
    with pytest.raises(Interrupted):
        compress(src, _recipe(target_bpw=6.0), tmp_path / "out", opts)
    compress(src, _recipe(target_bpw=6.0), tmp_path / "out", opts)
    assert chosen == [1] and calls == [0, 1, 1]
    plain, resumed = ((tmp_path / d / "model.safetensors").read_bytes() for d in ("plain", "out"))
    assert plain == resumed


def test_a_bf16_checkpoints_budget_counts_its_scales_in_bf16(tmp_path):
    """The plan's model computes in float32; the written scales are the checkpoint's dtype: a budget only bf16
    scales can meet is met, not refused."""
    src = zoo.save("llama", tmp_path / "bf16", dtype=torch.bfloat16)
    report = compress(src, _recipe(target_bpw=4.7), tmp_path / "out")  # int4 g32: 4.5 with bf16 scales, 5.0 fp32
    bits = _bits(report)
    assert (
        set(bits.values()) <= {4, 8}
        and 8
        * _target_bytes(tmp_path / "out", set(bits))
        / sum(r["shape"][0] * r["shape"][1] for r in report["layers"] if r.get("kind") == "quantize")
        <= 4.7
    )


def test_a_budget_after_a_pass_that_reshapes_its_sweep_is_refused(model_dir, tmp_path):
    steps = [{"type": "prune", "structured": "channels", "ratio": 0.25}, {**STEP, "target_bpw": 6.0}]
    with pytest.raises(SparsifyError, match=r"pass 1's bit budget decides each Linear before the sweep, and pass 0"):
        compress(model_dir("llama"), parse_recipe({"calibration": CALIB, "passes": steps}), tmp_path / "out")
    assert not (tmp_path / "out").exists()
