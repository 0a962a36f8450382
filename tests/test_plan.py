"""No silent wrong output: every combination of passes is correct or refused before work starts; the output is
checked before it is renamed into place; resume and re-runs give the same bytes; a collapsed model is called
out (docs/guarantees.md, "Combinations")."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
import yaml
from safetensors.torch import load_file, save_file

from tests import zoo
from tests.test_cli import CALIB, FAST, assert_user_error, run
from tests.test_guarantees import ROOT, _fault, _leftovers, _weights


@pytest.fixture(scope="module")
def deep(tmp_path_factory) -> Path:
    """A 4-layer Llama: layers can be removed twice, and a run can die with layers both done and to do."""
    return zoo.save("llama", tmp_path_factory.mktemp("deep") / "llama4", layers=4)


def compress(model: Path, out: Path, passes: list[dict], *extra: str, calibration: dict | None = None):
    recipe = out.parent / f"{out.name}.yaml"
    recipe.write_text(yaml.safe_dump({"calibration": calibration or {"samples": 4, "seq_len": 32}, "passes": passes}))
    return run("compress", model, "-r", recipe, "-o", out, *extra)


def logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    import sparsify

    with torch.no_grad():
        return sparsify.load(folder, kernel="exact").eval()(input_ids=ids).logits


IDS = torch.arange(3, 40).reshape(1, -1)
LAYERS = {"type": "prune", "structured": "layers", "remove": 1}
CHANNELS = {"type": "prune", "structured": "channels", "ratio": 0.25}
MOE = {"type": "moe", "experts": 4, "top_k": 2, "split": "random"}
W4 = {"type": "quantize", "scheme": "w4a16", "method": "rtn", "group_size": 32}


# ---------------------------------------------------------------------------------- combinations that work


def test_layers_removed_twice_agree_with_the_config(deep, tmp_path):
    out = tmp_path / "out"
    r = compress(deep, out, [LAYERS, LAYERS], "--no-eval", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    assert {k.split(".")[2] for k in load_file(out / "model.safetensors") if k.startswith("model.layers.")} == {
        "0",
        "1",
    }
    notes = json.loads(r.stdout)["notes"]
    assert sum("removed layers" in n for n in notes) == 2, notes
    T.AutoModelForCausalLM.from_pretrained(out)


def test_channels_then_moe_sizes_the_experts_from_the_pruned_width(deep, tmp_path):
    """With k = every expert the MoE model is exactly the channel-pruned one, so the sizes must be right."""
    pruned, moe = tmp_path / "pruned", tmp_path / "moe"
    assert compress(deep, pruned, [CHANNELS], "--no-eval").exit_code == 0
    r = compress(deep, moe, [CHANNELS, {**MOE, "top_k": 4}], "--no-eval")
    assert r.exit_code == 0, r.output
    cfg = json.loads((moe / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["intermediate_size"] == 96 // 4  # 128 * 0.75 = 96, in 4 experts
    torch.testing.assert_close(logits(moe, IDS), logits(pruned, IDS), atol=2e-5, rtol=1e-4)


def test_moe_then_quantize_keeps_the_routers_in_float(deep, tmp_path):
    out = tmp_path / "out"
    r = compress(deep, out, [MOE, W4], "--no-eval")
    assert r.exit_code == 0, r.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {f"model.layers.{i}.mlp.gate" for i in range(4)} <= set(qc["ignore"]), qc["ignore"]
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.0.block_sparse_moe.gate.weight"].dtype == torch.float32
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight_packed" in tensors
    assert torch.isfinite(logits(out, IDS)).all()
    assert run("eval", out, "--seq-len", "64", "--max-windows", "2").exit_code == 0


@pytest.mark.parametrize(
    "passes",
    [
        [{"type": "attention", "pattern": "sliding-window", "window": 16}, {"type": "prune", "sparsity": 0.5}],
        [{"type": "attention", "pattern": "sliding-window", "window": 16}, MOE],
        [{"type": "attention", "pattern": "sinks", "window": 12, "sinks": 4}, MOE],
        [{"type": "attention", "pattern": "sinks", "window": 12, "sinks": 4}, LAYERS],
        [{"type": "attention", "pattern": "sliding-window", "window": 16, "global_every": 2}, CHANNELS, W4],
        [LAYERS, CHANNELS, {"type": "prune", "sparsity": 0.5}, W4],
        [{"type": "prune", "structured": "heads", "ratio": 0.5}, LAYERS],
        [MOE, {"type": "prune", "sparsity": 0.5}],
        [MOE, LAYERS],
        [MOE, {"type": "attention", "pattern": "sliding-window", "window": 16}],
    ],
    ids=lambda passes: "+".join(
        p.get("pattern") or p.get("structured") or p.get("scheme") or p["type"] for p in passes
    ),
)
def test_combinations_a_user_would_expect_work(deep, tmp_path, passes):
    """Each writes an output that passed the output check (config vs every tensor, transformers' loader, a
    finite forward) and that sparsify.load runs."""
    out = tmp_path / "out"
    r = compress(deep, out, passes, "--no-eval")
    assert r.exit_code == 0, r.output
    assert torch.isfinite(logits(out, IDS)).all()


def test_attention_then_moe_keeps_the_window(deep, tmp_path):
    out = tmp_path / "out"
    assert (
        compress(
            deep, out, [{"type": "attention", "pattern": "sliding-window", "window": 16}, MOE], "--no-eval"
        ).exit_code
        == 0
    )
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["sliding_window"] == 16


# ---------------------------------------------------------------------------------- refused before any work


@pytest.mark.parametrize(
    ("passes", "fragments"),
    [
        ([MOE, CHANNELS], ["pass 1 (prune structured 25% of channels", "cannot follow pass 0 (moe", "experts"]),
        ([MOE, MOE], ["pass 1 (moe", "cannot follow pass 0 (moe", "dense FFN"]),
        ([W4, {"type": "prune", "sparsity": 0.5}], ["cannot follow pass 0 (quantize", "quantize last"]),
        ([CHANNELS, {**MOE, "experts": 5}], ["experts 5 does not divide intermediate_size 96"]),
        ([LAYERS, LAYERS, LAYERS, LAYERS], ["removing 1 of 1 layers leaves none"]),
    ],
)
def test_impossible_combinations_are_refused_before_any_work(deep, tmp_path, monkeypatch, passes, fragments):
    from sparsify.calibration import LayerwiseRunner

    def no_work(*_a, **_k):
        raise AssertionError("a layer was processed before the refusal")

    monkeypatch.setattr(LayerwiseRunner, "capture", no_work)
    out = tmp_path / "out"
    assert_user_error(compress(deep, out, passes), out, *fragments)


def test_a_quantized_input_takes_no_layer_pass(deep, tmp_path):
    q = tmp_path / "q"
    assert compress(deep, q, [W4], "--no-eval").exit_code == 0
    assert_user_error(run("prune", q, "-o", tmp_path / "out", "--sparsity", "0.5", *FAST), None, "already quantized")


# ---------------------------------------------------------------------------------- the output check


def test_an_output_whose_config_and_tensors_disagree_is_never_renamed_into_place(deep, tmp_path, monkeypatch):
    from sparsify.passes.structured import StructuredPrunePass

    edit = StructuredPrunePass.edit_config

    def wrong(self, cfg):
        new = edit(self, cfg)
        return {**new, "intermediate_size": new["intermediate_size"] + 8}

    monkeypatch.setattr(StructuredPrunePass, "edit_config", wrong)
    out = tmp_path / "out"
    assert_user_error(compress(deep, out, [CHANNELS], "--no-eval"), out, "failed its check", "config.json implies")


def test_an_output_missing_a_tensor_is_never_renamed_into_place(deep, tmp_path, monkeypatch):
    from sparsify.pipeline import stages as pipeline  # the module that calls it

    rest = pipeline.rest_keys
    monkeypatch.setattr(pipeline, "rest_keys", lambda *a: [kk for kk in rest(*a) if kk[0] != "model.norm.weight"])
    out = tmp_path / "out"
    assert_user_error(compress(deep, out, [{"type": "prune", "sparsity": 0.5}], "--no-eval"), out, "model.norm.weight")


# ---------------------------------------------------------------------------------- resume, re-run, recipe


@pytest.mark.slow
def test_resume_of_a_run_killed_after_its_sweep_writes_the_same_config(deep, tmp_path):
    reference = tmp_path / "reference"
    args = ["prune", deep, "--structured", "channels", "--ratio", "0.25", *FAST]
    assert run(*args[:2], "-o", reference, *args[2:]).exit_code == 0
    out = tmp_path / "out"
    r = _fault("killin@assemble", *args[:2], "-o", out, *args[2:])
    assert r.returncode == -signal.SIGKILL, r.stderr
    r = _fault("run", *args[:2], "-o", out, *args[2:], "--resume")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 96
    assert _weights(out) == _weights(reference)


@pytest.mark.slow
def test_moe_then_quantize_killed_and_resumed_gives_the_same_bytes(deep, tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "out"
    assert compress(deep, reference, [MOE, W4], "--no-eval").exit_code == 0
    recipe = tmp_path / "out.yaml"
    recipe.write_text((reference / "recipe.yaml").read_text())
    args = ["compress", deep, "-r", recipe, "-o", out, "--no-eval"]
    r = _fault("kill@2", *args)
    assert r.returncode == -signal.SIGKILL and not out.exists()
    r = _fault("run", *args, "--resume")
    assert r.returncode == 0, r.stderr
    assert _weights(out) == _weights(reference)
    assert run("eval", out, "--seq-len", "64", "--max-windows", "2").exit_code == 0


@pytest.mark.slow
@pytest.mark.parametrize("resume", [[], ["--resume"]])
def test_a_run_killed_before_it_recorded_anything_runs_again_without_overwrite(deep, tmp_path, resume):
    out = tmp_path / "out"
    args = ["prune", deep, "-o", out, "--sparsity", "0.5", *FAST]
    r = _fault("killin@begin", *args)
    assert r.returncode == -signal.SIGKILL and (tmp_path / ".out.partial").is_dir()
    r = run(*args, *resume)
    assert r.exit_code == 0, r.output
    assert _leftovers(tmp_path, out) == []


RECIPES = {
    "wanda": ["prune", "--method", "wanda", "--sparsity", "0.5"],
    "sparsegpt-2:4": ["prune", "--method", "sparsegpt", "--pattern", "2:4"],
    "owl": ["prune", "--sparsity", "0.6", "--sparsity-profile", "owl"],
    "channels": ["prune", "--structured", "channels", "--ratio", "0.25", "--metric", "flap", "--bias-compensation"],
    "heads": ["prune", "--structured", "heads", "--ratio", "0.5"],
    "layers": ["prune", "--structured", "layers", "--remove", "1", "--metric", "angular"],
    "w8a8": ["quantize", "--scheme", "w8a8", "--smoothquant", "0.5"],
    "w8a8-static": ["quantize", "--scheme", "w8a8-static"],
    "w4a16": ["quantize", "--scheme", "w4a16", "--group-size", "32"],
    "w4a16-rtn-asym": ["quantize", "--scheme", "w4a16", "--method", "rtn", "--group-size", "32", "--asymmetric"],
    "qat": ["quantize", "--scheme", "w4a16", "--group-size", "32", "--qat-steps", "2"],
    "moe": ["moe-convert", "--experts", "4", "--top-k", "2", "--split", "coactivation", "--router", "analytic"],
    "bf16": ["prune", "--method", "sparsegpt", "--sparsity", "0.5", "--dtype", "bfloat16"],
}


@pytest.mark.parametrize("case", RECIPES)  # the quick loop keeps a few (tests/conftest.py QUICK_CASES)
def test_the_written_recipe_reproduces_the_output(deep, tmp_path, case):
    command, *flags = RECIPES[case]
    first, second = tmp_path / "first", tmp_path / "second"
    r = run(command, deep, "-o", first, *flags, *FAST)
    assert r.exit_code == 0, r.output
    recipe = tmp_path / "recipe.yaml"
    shutil.copy(first / "recipe.yaml", recipe)
    r = run("compress", deep, "-r", recipe, "-o", second, "--no-eval")
    assert r.exit_code == 0, r.output
    assert _weights(second) == _weights(first)


def test_the_written_recipe_spells_out_only_what_applies(deep, tmp_path):
    out = tmp_path / "out"
    assert run("quantize", deep, "-o", out, "--scheme", "w8a8", *FAST).exit_code == 0
    step = yaml.safe_load((out / "recipe.yaml").read_text())["passes"][0]
    assert step["method"] == "gptq" and step["dampening"] == 0.01 and step["weight_observer"] == "minmax"
    assert "observer" not in step and "group_size" not in step and "smoothquant" not in step


# ---------------------------------------------------------------------------------- the quality signal


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny Llama trained briefly on the calibration text: its perplexity is far below a random model's, so a
    destructive setting visibly collapses it."""
    model = zoo.build("llama")
    tok = zoo.tokenizer()
    ids = torch.tensor(tok("\n\n".join(zoo.training_text()))["input_ids"])
    windows = ids[: (ids.numel() // 64) * 64].reshape(-1, 64)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        batch = windows[torch.randint(len(windows), (16,))]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    folder = tmp_path_factory.mktemp("trained") / "llama"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_perplexity_before_and_after_is_measured_by_default_on_held_out_calibration_text(trained, tmp_path, calib_file):
    out = tmp_path / "out"
    r = run("prune", trained, "-o", out, "--sparsity", "0.3", "--calib", calib_file, *CALIB, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    ev = report["eval"]
    assert "held-out" in ev["text"] and ev["before"] < 100 and ev["after"] >= ev["before"] * 0.9
    assert report["quality"]["status"] == "ok"
    assert "perplexity" in (out / "README.md").read_text()


def test_a_collapsed_model_is_a_loud_warning_and_with_max_ppl_ratio_an_error(trained, tmp_path, monkeypatch):
    """97% magnitude pruning takes this tiny model from ~17 to ~49 (its embeddings alone carry a bigram model: 2.8×,
    under the default warning threshold of 3×, which the test lowers to 2×; on SmolLM2, docs/benchmarks.md)."""
    from sparsify.pipeline import flow as pipeline  # the module that reads it

    monkeypatch.setattr(pipeline, "WARN_PPL_RATIO", 2.0)
    out = tmp_path / "out"
    r = run("prune", trained, "-o", out, "--method", "magnitude", "--sparsity", "0.97", *CALIB)
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: perplexity")]
    assert len(warnings) == 1 and "past the warning threshold of 2×" in warnings[0], r.stderr
    assert json.loads((out / "sparsify_report.json").read_text())["quality"]["status"] == "warning"
    strict = tmp_path / "strict"
    r = run(
        "prune", trained, "-o", strict, "--method", "magnitude", "--sparsity", "0.97", *CALIB, "--max-ppl-ratio", "2"
    )
    assert r.exit_code == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "--max-ppl-ratio limit of 2×" in errors[0] and str(strict) in errors[0]
    assert json.loads((strict / "sparsify_report.json").read_text())["quality"]["status"] == "failed"
    assert "QUALITY" in r.stdout  # the summary is printed, with the verdict


def test_no_eval_skips_it(deep, tmp_path):
    r = run("prune", deep, "-o", tmp_path / "out", "--sparsity", "0.5", *FAST, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["eval"] is None
    assert_user_error(run("prune", deep, "-o", tmp_path / "o2", "--sparsity", "0.5", *FAST, "--max-ppl-ratio", "2"),
                      None, "--no-eval", "--max-ppl-ratio")  # fmt: skip


# ---------------------------------------------------------------------------------- smaller findings


def test_a_non_finite_input_tensor_is_refused_naming_it(deep, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(deep, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.2.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    assert_user_error(
        run("prune", bad, "-o", out, "--sparsity", "0.5", *FAST), out, "model.layers.2.mlp.up_proj.weight"
    )
    r = run("eval", bad, "--seq-len", "64", "--max-windows", "2")
    assert r.exit_code == 1 and "not finite" in r.stderr


def test_paths_are_escaped_in_markdown(deep, tmp_path):
    model = tmp_path / "my_*model*|[x]"
    shutil.copytree(deep, model)
    out = tmp_path / "out"
    assert run("prune", model, "-o", out, "--sparsity", "0.5", *FAST).exit_code == 0
    card = (out / "README.md").read_text()
    assert r"my\_\*model\*\|\[x\]" in card and "my_*model*" not in card
    md = run("report", out).stdout
    assert r"my\_\*model\*\|\[x\]" in md and "|[x]" not in md


def test_records_without_text_are_counted_and_warned_about(deep, tmp_path):
    data = tmp_path / "calib.jsonl"
    rows = [{"text": t} for t in zoo.training_text()] + [{"text": ""}, {"text": None}, {"other": "x"}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    r = run("prune", deep, "-o", tmp_path / "out", "--sparsity", "0.5", "--calib", data, *FAST, "--json")
    assert r.exit_code == 0, r.output
    assert "warning: calib.jsonl: 3 of 23 records have no text in 'text'" in r.stderr
    assert any("3 of 23 records" in n for n in json.loads(r.stdout)["notes"])


def test_stderr_is_quiet_unless_asked(deep, tmp_path):
    args = ["quantize", deep, "--scheme", "w4a16", "--group-size", "32", "--qat-steps", "2", *FAST]
    for extra in (["--json"], []):
        r = run(*args[:2], "-o", tmp_path / f"q{len(extra)}", *args[2:], *extra)
        assert r.exit_code == 0 and "layer loss" not in r.stderr and "Decompressing" not in r.stderr, r.stderr
    r = run(*args[:2], "-o", tmp_path / "v", *args[2:], "-v")
    assert r.exit_code == 0 and "QAT model.layers.0: layer loss" in r.stderr


def test_a_signal_in_the_last_moments_of_exit_is_not_a_silent_death(tmp_path):
    """After the command, sparsify's own exit runs the exit hooks under its handler and ends the process with
    signals blocked: Python's finalization, where default handlers are back, never runs."""
    late = (
        "import os, signal, sys, sparsify._entry as e, sparsify.cli as c;"
        "c.main = lambda: print('done');"
        "block = signal.pthread_sigmask;"
        "signal.pthread_sigmask = lambda how, s: (block(how, s), os.kill(os.getpid(), signal.SIGTERM));"
        "e.main()"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", late], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "done\n" and r.stderr == "", r
