"""Distillation (end-to-end recovery from the dense model's logits): a stage of its own after the layer passes.

What compression decided survives (masks, N:M patterns, quantization grids, shapes), the KL divergence to the
dense model goes down, the output reloads to the model trained in memory, an interrupted run resumes to the
same bytes, and bad orders and budgets are refused before any work.
"""

from __future__ import annotations

import json
import signal

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from safetensors.torch import load_file

import sparsify
from sparsify.interrupts import Interrupted
from sparsify.pipeline import Options
from sparsify.recipe import parse_recipe
from tests.test_cli import FAST, assert_user_error, run
from tests.test_guarantees import _fault, _weights, deep  # noqa: F401 - deep is a fixture
from tests.test_quantize import _tokens
from tests.zoo import compress

CALIB = {"samples": 8, "seq_len": 32, "batch_size": 4}
DISTILL = {"type": "distill", "tokens": 512, "windows": 2, "lr": 1e-2, "precision": "fp32"}
CASES = {
    "sparsegpt-2:4": [{"type": "prune", "method": "sparsegpt", "pattern": "2:4"}],
    "flap-channels": [
        {"type": "prune", "structured": "channels", "ratio": 0.25, "metric": "flap", "bias_compensation": True}
    ],
    "w4a16-rtn": [{"type": "quantize", "scheme": "w4a16", "method": "rtn", "group_size": 32}],
    "moe": [{"type": "moe", "experts": 4, "top_k": 2}],
}


def _recipe(passes: list[dict], calibration: dict | None = None):
    return parse_recipe({"calibration": calibration or CALIB, "passes": passes})


def _records(report: dict) -> list[dict]:
    return [r for r in report["layers"] if r.get("kind") == "distill"]


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("case", list(CASES))
def test_distillation_lowers_the_kl_keeps_what_compression_decided_and_reloads(case, model_dir, tmp_path):
    src = model_dir("llama")
    plain, tuned = tmp_path / "plain", tmp_path / "tuned"
    compress(src, _recipe(CASES[case]), plain)
    report = compress(src, _recipe([*CASES[case], DISTILL]), tuned)
    (record,) = _records(report)
    assert record["status"] == "distilled" and record["loss_after"] < record["loss_before"]
    assert record["steps"] == 512 // (2 * 32) and record["tokens"] == 512

    def cfg(p):
        return {k: v for k, v in json.loads((p / "config.json").read_text()).items() if k != "transformers_version"}

    assert cfg(tuned) == cfg(plain)
    a, b = load_file(plain / "model.safetensors"), load_file(tuned / "model.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (v.shape, v.dtype) for k, v in b.items()}
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert any(".layers." in k for k in changed)  # it trained
    assert all(".layers." in k for k in changed)  # embeddings, final norm and head are left alone
    for k, w in a.items():
        if k.endswith(".weight") and w.dim() == 2 and w.is_floating_point() and ".layers." in k:
            assert ((w == 0) <= (b[k] == 0)).all(), k  # every zero of the compression is still zero
            if case == "sparsegpt-2:4" and k.endswith("_proj.weight"):
                assert ((b[k].reshape(-1, 4) == 0).sum(1) >= 2).all(), k  # the 2:4 pattern holds
        if k.endswith("weight_scale"):
            assert (torch.sign(b[k]) == torch.sign(w)).all(), k
        if k.endswith("weight_packed"):
            shape = torch.Size(b[k.replace("weight_packed", "weight_shape")].tolist())
            codes = unpack_from_int32(b[k], 4, shape)
            assert codes.min() >= -8 and codes.max() <= 7  # back on the int4 grid
    # the distilled output is closer to the dense model than the plain one, on the calibration windows
    ids = _tokens(src)[:4]  # (4, 32): the calibration's first windows
    dense = sparsify.load(src)
    d = torch.log_softmax(_logits(dense, ids), -1)

    def kl(path):
        q = torch.log_softmax(_logits(sparsify.load(path, kernel="reference"), ids), -1)
        return float((d.exp() * (d - q)).sum(-1).mean())

    assert kl(tuned) < kl(plain)


def test_distillation_follows_heal_and_the_report_measures_before_healing(model_dir, tmp_path):
    from sparsify.pipeline import Options
    from sparsify.pipeline import compress as measured
    from sparsify.report import summary_rows

    src = model_dir("llama")
    step = CASES["sparsegpt-2:4"]
    opts = Options(eval_seq_lens=(32,), eval_max_windows=6)
    healed = measured(src, _recipe([*step, {"type": "heal", "steps": 10, "precision": "fp32"}]), tmp_path / "h", opts)
    both = measured(
        src, _recipe([*step, {"type": "heal", "steps": 10, "precision": "fp32"}, DISTILL]), tmp_path / "hd", opts
    )
    assert both["eval"]["before_recovery"] == healed["eval"]["before_recovery"]  # before healing, not before distill
    after_heal = healed["eval"]["after"]
    assert any(
        n.startswith("perplexity before distillation: ")
        and float(n.split(": ")[1]) == pytest.approx(after_heal, rel=1e-3)
        for n in both["notes"]
    )
    assert [r["layer"] for r in both["layers"] if r.get("kind") == "heal"] == [0, 1]
    (record,) = _records(both)
    assert record["loss_after"] < record["loss_before"]
    assert any("KL to the dense model" in text for _, text in summary_rows(both))


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: the LM head tied to the embeddings, soft-capped
def test_distillation_alone_reports_the_perplexity_before_it(family, model_dir, tmp_path):
    from sparsify.pipeline import Options
    from sparsify.pipeline import compress as measured

    src, step = model_dir(family), [{"type": "prune", "method": "magnitude", "pattern": "2:4"}]
    opts = Options(eval_seq_lens=(32,), eval_max_windows=6)
    plain = measured(src, _recipe(step), tmp_path / "plain", opts)
    tuned = measured(src, _recipe([*step, DISTILL]), tmp_path / "tuned", opts)
    before = tuned["eval"]["before_recovery"]
    assert before["step"] == "distillation"
    assert before["perplexity"] == pytest.approx(plain["eval"]["after"], rel=1e-5)
    assert tuned["eval"]["after"] < before["perplexity"]


def test_a_distillation_that_does_not_help_leaves_the_model_as_compressed(model_dir, tmp_path):
    src, step = model_dir("llama"), CASES["w4a16-rtn"]
    compress(src, _recipe(step), tmp_path / "plain")
    report = compress(src, _recipe([*step, {**DISTILL, "tokens": 128, "lr": 50.0}]), tmp_path / "wild")
    assert _records(report)[0]["status"] == "kept as compressed"
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "wild" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("passes", "message"),
    [
        ([DISTILL], "nothing to recover"),
        ([{"type": "attention", "pattern": "sliding-window", "window": 8}, DISTILL], "nothing to recover"),
        ([{**DISTILL, "tokens": 0}], "tokens"),
    ],
)
def test_distill_with_nothing_before_it_or_no_budget_is_refused(passes, message, model_dir, tmp_path):
    from sparsify.errors import SparsifyError

    with pytest.raises(SparsifyError, match=message):
        compress(model_dir("llama"), _recipe(passes), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_distill_without_calibration_data_is_refused(model_dir, tmp_path):
    from sparsify.errors import SparsifyError

    step = {"type": "prune", "method": "magnitude", "sparsity": 0.5}
    with pytest.raises(SparsifyError, match="needs calibration data"):
        compress(model_dir("llama"), _recipe([step, DISTILL], {**CALIB, "data": "none"}), tmp_path / "out")


def test_cli_distill_runs_after_heal_whatever_the_flag_order(model_dir, tmp_path):
    out = tmp_path / "out"
    r = run(
        "prune", model_dir("llama"), "-o", out, "--method", "magnitude", "--sparsity", "0.5", "--distill",
        "--distill-tokens", "256", "--heal", "--heal-steps", "5", *FAST,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    recipe = (out / "recipe.yaml").read_text()
    assert recipe.index("type: prune") < recipe.index("type: heal") < recipe.index("type: distill")
    assert "tokens: 256" in recipe


def test_cli_distill_budget_error_names_the_flag(model_dir, tmp_path):
    out = tmp_path / "out"
    r = run("prune", model_dir("llama"), "-o", out, "--sparsity", "0.5", "--distill", "--distill-tokens", "0", *FAST)
    assert r.exit_code == 2
    assert_user_error(r, out, "--distill-tokens")


@pytest.mark.slow
def test_an_interrupted_distillation_resumes_to_the_same_bytes(deep, tmp_path):  # noqa: F811
    """Killed hard inside the distillation (the stage before it complete): --resume trains again from that
    stage's output and writes the same bytes as a run never interrupted."""
    args = ["prune", deep, "--method", "wanda", "--sparsity", "0.5", *FAST,
            "--distill", "--distill-tokens", "256", "--distill-precision", "fp32"]  # fmt: skip
    reference = tmp_path / "reference"
    assert run(*args[:2], "-o", reference, *args[2:]).exit_code == 0
    out = tmp_path / "out"
    r = _fault("killin@kl", *args[:2], "-o", out, *args[2:])
    assert r.returncode == -signal.SIGKILL and not out.exists()
    r = _fault("run", *args[:2], "-o", out, *args[2:], "--resume")
    assert r.returncode == 0, r.stderr
    assert _weights(out) == _weights(reference)


def test_distill_on_an_encoder_is_refused_before_any_work(model_dir, tmp_path):
    from sparsify.errors import SparsifyError

    step = {"type": "prune", "method": "magnitude", "sparsity": 0.5}
    with pytest.raises(SparsifyError, match="encoder"):
        compress(model_dir("bert"), _recipe([step, DISTILL]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_resumed_distillation_keeps_the_precision_it_decided(model_dir, tmp_path, monkeypatch):
    """precision auto is decided once and saved with the stage: a run resumed inside the stage takes it back."""
    from sparsify.passes import distill

    src, passes = model_dir("llama"), [CASES["sparsegpt-2:4"][0], {**DISTILL, "precision": "auto"}]
    choices = iter(["bf16", "fp32"])  # what two measurements would say
    monkeypatch.setattr(distill, "fit_precision", lambda layers, device, who: next(choices))
    seen = []
    original = distill.DistillPass.fit_model

    def fit_model(self, work):
        seen.append(self.precision)
        if len(seen) == 1:
            raise Interrupted(signal.SIGINT)  # stopped inside the stage, after its decision was saved
        return original(self, work)

    monkeypatch.setattr(distill.DistillPass, "fit_model", fit_model)
    opts = Options(evaluate=False, resume=True)
    with pytest.raises(Interrupted):
        compress(src, _recipe(passes), tmp_path / "out", opts)
    report = compress(src, _recipe(passes), tmp_path / "out", opts)
    assert seen == ["bf16", "bf16"] and _records(report)[0]["precision"] == "bf16"


def test_a_distillation_stopped_after_saving_its_layers_resumes_without_training_again(
    model_dir, tmp_path, monkeypatch
):
    """Stopped while its output was assembled (every trained layer saved): --resume assembles it without training
    again, to the same bytes, records and perplexity before distillation as a run never interrupted."""
    from sparsify import pipeline
    from sparsify.passes import distill
    from sparsify.pipeline import stages  # the module that calls it

    src, recipe = model_dir("llama"), _recipe([CASES["sparsegpt-2:4"][0], DISTILL])
    opts = Options(eval_seq_lens=(32,), eval_max_windows=6, resume=True)
    reference = pipeline.compress(src, recipe, tmp_path / "reference", opts)
    calls = {"assemble": 0, "fit": 0}
    assemble, fit = stages._assemble_stage, distill.DistillPass.fit_model

    def stopping(*args, **kwargs):
        calls["assemble"] += 1
        if calls["assemble"] == 2:  # the pruning stage's, then the distillation's
            raise Interrupted(signal.SIGTERM)
        return assemble(*args, **kwargs)

    def counting(self, work):
        calls["fit"] += 1
        return fit(self, work)

    monkeypatch.setattr(stages, "_assemble_stage", stopping)
    monkeypatch.setattr(distill.DistillPass, "fit_model", counting)
    with pytest.raises(Interrupted):
        pipeline.compress(src, recipe, tmp_path / "out", opts)
    report = pipeline.compress(src, recipe, tmp_path / "out", opts)
    assert calls == {"assemble": 4, "fit": 1}  # the resumed run trained nothing
    assert _weights(tmp_path / "out") == _weights(tmp_path / "reference")

    def timeless(records):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records]

    assert timeless(_records(report)) == timeless(_records(reference))
    assert report["eval"]["before_recovery"] == reference["eval"]["before_recovery"]
