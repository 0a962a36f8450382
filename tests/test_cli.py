"""The CLI end to end, and every bad input: one line on stderr, non-zero exit, no traceback, no partial output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers as T
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from sparsify.cli import app

runner = CliRunner()
CALIB = ["--samples", "4", "--seq-len", "32"]  # tiny calibration
FAST = [*CALIB, "--no-eval"]  # and no perplexity before/after, where the test is not about it


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def run_process(*args: object, env: dict[str, str] | None = None) -> SimpleNamespace:
    """``python -m sparsify ARGS`` as its own process (the entry point users run, from its first import to its exit
    code), read as :func:`run`'s result is: ``exit_code``, ``stdout``, ``stderr``, ``output``."""
    cmd = [sys.executable, "-m", "sparsify", *map(str, args)]
    r = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env={**os.environ, **(env or {})},
                       capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    return SimpleNamespace(exit_code=r.returncode, stdout=r.stdout, stderr=r.stderr, output=r.stdout + r.stderr)


# A test parametrized over "cli" runs the same commands in-process (the quick loop) and as a process (`slow`).
CLI = {"in-process": run, "process": run_process}


def assert_user_error(result, out: Path | None, *fragments: str) -> None:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr  # one line, last (progress bars may precede)
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    if out is not None:
        assert not out.exists()
        siblings = out.parent.iterdir() if out.parent.exists() else []
        assert not [p for p in siblings if p.name.startswith(f".{out.name}.")], "temporary folder left"


def test_prune_cli_end_to_end_json(model_dir, tmp_path):
    out = tmp_path / "out"
    result = run("prune", model_dir("llama"), "-o", out, "--method", "wanda", "--sparsity", "0.5", *FAST, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["totals"]["target_sparsity"] == pytest.approx(0.5)
    assert (out / "recipe.yaml").is_file() and (out / "sparsify_report.json").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["passes"][0]["method"] == "wanda" and recipe["calibration"]["samples"] == 4
    T.AutoModelForCausalLM.from_pretrained(out)  # loads with plain transformers


def test_compress_recipe_equals_prune_flags(model_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "calibration: {samples: 4, seq_len: 32}\npasses:\n  - {type: prune, method: sparsegpt, pattern: '2:4'}\n"
    )
    a, b = tmp_path / "a", tmp_path / "b"
    assert run("compress", model_dir("llama"), "-r", recipe, "-o", a).exit_code == 0
    assert run("prune", model_dir("llama"), "-o", b, "--method", "sparsegpt", "--pattern", "2:4", *FAST).exit_code == 0
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "recipe.yaml").read_text() == (b / "recipe.yaml").read_text()


def test_eval_report_inspect(model_dir, tmp_path, calib_file):
    out = tmp_path / "out"
    r = run("prune", model_dir("llama"), "-o", out, "--sparsity", "0.5", *CALIB, "--eval", calib_file)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "sparsify_report.json").read_text())
    assert report["eval"]["before"] > 1 and report["eval"]["after"] > 1
    assert report["eval"]["seq_len"] == 256 and report["eval"]["tokens"] > 0  # 512 is past the model's 256
    assert any("beyond max_position_embeddings 256" in note for note in report["notes"])

    r = run("eval", out, "--data", calib_file, "--seq-len", "64", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["perplexity"] > 1

    md = run("report", out, "--baseline", model_dir("llama"))
    assert md.exit_code == 0 and r"| model.layers.0.self\_attn.q\_proj |" in md.stdout and "baseline" in md.stdout
    html = run("report", out, "--format", "html")
    assert html.exit_code == 0 and html.stdout.startswith("<!doctype html>") and "<svg" in html.stdout
    js = run("report", out, "--format", "json")
    assert json.loads(js.stdout)["layers"][0]["status"] == "pruned"

    info = run("inspect", model_dir("gpt2"), "--json")
    assert info.exit_code == 0
    data = json.loads(info.stdout)
    assert data["layers_path"] == "transformer.h" and data["num_layers"] == 2
    assert data["targets_per_layer"][0]["name"] == "transformer.h.0.attn.c_attn"
    assert data["targets_per_layer"][0]["shape"] == [192, 64]  # (out, in) even though Conv1D stores (in, out)


def test_owl_profile_gives_uneven_layer_sparsity_with_the_same_mean(model_dir, tmp_path):
    out = tmp_path / "out"
    r = run("prune", model_dir("llama"), "-o", out, "--sparsity", "0.6", "--sparsity-profile", "owl", *FAST, "--json")
    assert r.exit_code == 0, r.output
    layers = json.loads(r.stdout)["layers"]
    per_layer = {rec["layer"]: rec["target_sparsity"] for rec in layers}
    assert per_layer[0] != per_layer[1]
    assert sum(per_layer.values()) / 2 == pytest.approx(0.6)
    for rec in layers:
        assert rec["sparsity"] == pytest.approx(rec["target_sparsity"], abs=1 / rec["shape"][1])


def test_targets_and_ignore(model_dir, tmp_path):
    out = tmp_path / "out"
    r = run(
        "prune",
        model_dir("llama"),
        "-o",
        out,
        "--sparsity",
        "0.5",
        *FAST,
        "--json",
        "--targets",
        "re:.*mlp\\..*",
        "--ignore",
        "down_proj",
        "--targets",
        "lm_head",
    )
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    names = {rec["name"].split(".", 3)[-1] for rec in report["layers"]}
    assert names == {"mlp.gate_proj", "mlp.up_proj"}
    assert any("lm_head" in note for note in report["notes"]), "a matched but skipped module is reported"


def test_unknown_architecture_needs_targets_then_works(tmp_path):
    folder = tmp_path / "falcon"
    cfg = T.FalconConfig(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    from tests.zoo import tokenizer

    tokenizer().save_pretrained(folder)
    out = tmp_path / "out"
    assert_user_error(run("prune", folder, "-o", out, "--sparsity", "0.5", *FAST), out, "falcon", "--targets")
    r = run("prune", folder, "-o", out, "--sparsity", "0.5", *FAST, "--targets", "re:.*dense.*", "--json")
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)["layers"]) == 6  # self_attention.dense, dense_h_to_4h, dense_4h_to_h × 2


# ------------------------------------------------------------------------------------- bad input


def test_bad_yaml(model_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes: [type: prune\n  method: : wanda")
    out = tmp_path / "out"
    assert_user_error(run("compress", model_dir("llama"), "-r", recipe, "-o", out), out, "invalid YAML", "line")


def test_unknown_key_names_its_path(model_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - type: prune\n    method: wanda\n    sparsity: 0.5\n    sparsty: 0.5\n")
    out = tmp_path / "out"
    assert_user_error(
        run("compress", model_dir("llama"), "-r", recipe, "-o", out), out, "passes.0.sparsty", "Extra inputs"
    )


def test_unknown_method_lists_choices(model_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - {type: prune, method: wandaa, sparsity: 0.5}\n")
    out = tmp_path / "out"
    assert_user_error(
        run("compress", model_dir("llama"), "-r", recipe, "-o", out), out, "method", "'wandaa'", "sparsegpt"
    )


@pytest.mark.parametrize("value", ["1.0", "1.5", "-0.1"])
def test_sparsity_out_of_range(model_dir, tmp_path, value):
    out = tmp_path / "out"
    assert_user_error(run("prune", model_dir("llama"), "-o", out, "--sparsity", value), out, "sparsity", value)


@pytest.mark.parametrize("pattern", ["4:4", "5:4", "0:4", "2-4"])
def test_bad_nm_pattern(model_dir, tmp_path, pattern):
    out = tmp_path / "out"
    assert_user_error(run("prune", model_dir("llama"), "-o", out, "--pattern", pattern), out, "pattern")


def test_missing_model(tmp_path):
    out = tmp_path / "out"
    assert_user_error(run("prune", tmp_path / "nope", "-o", out, "--sparsity", "0.5"), out, "not found")


def test_folder_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    out = tmp_path / "out"
    assert_user_error(run("prune", tmp_path / "m", "-o", out, "--sparsity", "0.5"), out, "config.json")


def test_corrupt_checkpoint(model_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(model_dir("llama"), bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    assert_user_error(run("prune", bad, "-o", out, "--sparsity", "0.5", *FAST), out, "model.safetensors")


def test_checkpoint_missing_a_tensor(model_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(model_dir("llama"), bad)
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, bad / "model.safetensors")
    out = tmp_path / "out"
    assert_user_error(run("prune", bad, "-o", out, "--sparsity", "0.5", *FAST), out, "up_proj")


def test_no_tokenizer(model_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(model_dir("llama"), bad)
    for f in bad.glob("tokenizer*"):
        f.unlink()
    out = tmp_path / "out"
    assert_user_error(run("prune", bad, "-o", out, "--sparsity", "0.5", *FAST), out, "tokenizer")


def test_empty_calibration_file(model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "out"
    assert_user_error(run("prune", model_dir("llama"), "-o", out, "--sparsity", "0.5", "--calib", empty), out, "empty")


def test_calibration_too_short(model_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("hello world")
    out = tmp_path / "out"
    assert_user_error(run("prune", model_dir("llama"), "-o", out, "--sparsity", "0.5", "--calib", short), out, "tokens")


def test_nan_after_pass(model_dir, tmp_path):
    """Fails at layer 1, after layer 0 was saved: the partial folder and the parents made for OUT go too."""
    bad = tmp_path / "bad"
    shutil.copytree(model_dir("llama"), bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.self_attn.v_proj.weight"][3, 5] = float("nan")
    save_file(tensors, bad / "model.safetensors")
    out = tmp_path / "a" / "b" / "out"
    assert_user_error(run("prune", bad, "-o", out, "--sparsity", "0.5", "--method", "magnitude", *FAST), out, "NaN")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_existing_output_needs_overwrite_which_replaces_only_sparsify_outputs(model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    # the user's files: the refusal says to choose another folder, not to pass --overwrite (which would not help)
    first = run("prune", model_dir("llama"), "-o", out, "--sparsity", "0.5", *FAST)
    assert_user_error(first, None, "not a sparsify output", "keep.txt", "1 entry,", "choose another folder")
    assert "pass --overwrite" not in first.output
    assert_user_error(
        run("prune", model_dir("llama"), "-o", out, "--sparsity", "0.5", *FAST, "--overwrite"),
        None,
        "not a sparsify output",
        "keep.txt",
    )
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()  # an empty folder may be replaced
    assert_user_error(run("prune", model_dir("llama"), "-o", out, "--sparsity", "0.5", *FAST), None, "--overwrite")
    assert run("prune", model_dir("llama"), "-o", out, "--sparsity", "0.5", *FAST, "--overwrite").exit_code == 0
    first = (out / "sparsify_report.json").read_text()
    r = run("prune", model_dir("llama"), "-o", out, "--sparsity", "0.3", *FAST, "--overwrite")  # and an earlier output
    assert r.exit_code == 0 and (out / "sparsify_report.json").read_text() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_inside_model_is_refused(model_dir, tmp_path):
    src = tmp_path / "m"
    shutil.copytree(model_dir("llama"), src)
    before = sorted(p.name for p in src.iterdir())
    assert_user_error(run("prune", src, "-o", src / "sub", "--sparsity", "0.5", "--overwrite"), None, "inside")
    assert_user_error(run("prune", src, "-o", src, "--sparsity", "0.5", "--overwrite"), None, "model folder")
    assert sorted(p.name for p in src.iterdir()) == before


def test_debug_shows_traceback(tmp_path):
    result = run("prune", tmp_path / "nope", "-o", tmp_path / "out", "--sparsity", "0.5", "--debug")
    assert result.exit_code != 0
    assert result.exception is not None  # re-raised for the traceback


def test_report_on_non_output_folder(tmp_path):
    assert_user_error(run("report", tmp_path), None, "sparsify_report.json")


def test_input_is_never_modified(model_dir, tmp_path):
    src = tmp_path / "m"
    shutil.copytree(model_dir("gpt2"), src)
    snapshot = {p.name: p.read_bytes() for p in src.iterdir()}
    assert run("prune", src, "-o", tmp_path / "out", "--method", "sparsegpt", "--pattern", "2:4", *FAST).exit_code == 0
    assert {p.name: p.read_bytes() for p in src.iterdir()} == snapshot


def test_encoder_eval_is_embedding_similarity(model_dir, tmp_path, calib_file):
    out = tmp_path / "out"
    r = run("prune", model_dir("bert"), "-o", out, "--method", "sparsegpt", "--sparsity", "0.5", *CALIB,
            "--eval", "heldout", "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    ev = json.loads(r.stdout)["eval"]
    assert ev["metric"] == "cosine" and 0.0 < ev["cosine_mean"] < 1.0 and ev["texts"] > 10
    same = run("eval", model_dir("bert"), "--baseline", model_dir("bert"), "--json")
    assert same.exit_code == 0 and json.loads(same.stdout)["cosine_mean"] == pytest.approx(1.0, abs=1e-6)
    assert_user_error(run("eval", out), None, "--baseline")


def test_dense_targets_only_on_first_pass_and_bad_regex(model_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "passes:\n  - {type: prune, method: wanda, sparsity: 0.3, targets: [q_proj]}\n"
        "  - {type: prune, method: sparsegpt, sparsity: 0.5, dense_targets: true}\n"
    )
    out = tmp_path / "out"
    assert_user_error(run("compress", model_dir("llama"), "-r", recipe, "-o", out), out, "first pruning pass")
    assert_user_error(
        run("prune", model_dir("llama"), "-o", out, "--sparsity", "0.5", "--targets", "re:("), out, "regex"
    )


def test_llm_compressor_target_spelling_has_its_meaning(model_dir, tmp_path):
    """`re:` matches from the start of the name (re.match), class names like Linear match, as in compressed-tensors."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "calibration: {samples: 4, seq_len: 32}\npasses:\n"
        "  - {type: prune, method: magnitude, sparsity: 0.5, targets: [Linear], ignore: [lm_head, 're:model.layers.0']}\n"
    )
    r = run("compress", model_dir("llama"), "-r", recipe, "-o", tmp_path / "out", "--json")
    assert r.exit_code == 0, r.output
    names = {rec["name"] for rec in json.loads(r.stdout)["layers"]}
    assert len(names) == 7 and all(n.startswith("model.layers.1.") for n in names)


@pytest.mark.parametrize(
    ("flag", "entry"), [("--targets", "q_prj"), ("--ignore", "re:.*mlp.gate$"), ("--ignore", "nope")]
)
def test_a_target_or_ignore_entry_that_matches_nothing_is_an_error(model_dir, tmp_path, flag, entry):
    out = tmp_path / "out"
    r = run("prune", model_dir("llama"), "-o", out, "--sparsity", "0.5", *FAST, flag, entry)
    assert_user_error(r, out, repr(entry), "matches no")


def test_help_manners():
    """-h as --help; bare sparsify shows the help on stdout with exit 0; help names no Python types."""
    for args in (["-h"], ["prune", "-h"], ["quantize", "--help"], []):
        r = run(*args)
        assert r.exit_code == 0 and "Usage:" in r.stdout, (args, r.output)
    text = run("prune", "-h").stdout
    assert "Usage: sparsify prune MODEL [OPTIONS]" in " ".join(text.split()).replace("python -m ", "")
    for python_type in ("<str>", "<int", "<float", "list[", "{MODEL}", "range>"):
        assert python_type not in text, python_type
    from sparsify.cli import reference

    twice = [line for line in reference().splitlines() if line.count("[default:") > 1]
    assert not twice, twice  # an option's help that names its default when the CLI shows it too


def test_flag_errors_name_the_flag_and_choices_take_any_case(model_dir, tmp_path):
    out = tmp_path / "out"
    r = run("prune", model_dir("llama"), "-o", out, "--sparsity", "1.5", *FAST)
    assert_user_error(r, out, "--sparsity", "1.5")
    assert r.exit_code == 2 and "passes.0" not in r.stderr and "Value error" not in r.stderr
    r = run("quantize", model_dir("llama"), "-o", out, "--scheme", "W4A16", "--observer", "mse", *FAST)
    assert_user_error(r, out, "--observer", "w8a8-static")
    r = run("quantize", model_dir("llama"), "-o", out, "--scheme", "w4", *FAST)  # a choice typer checks itself
    assert_user_error(r, out, "--scheme", "'w4' is not one of", "w4a16")
    assert "Value error" not in r.stderr
    r = run("quantize", model_dir("llama"), "-o", out, "--scheme", "W8A16", "--method", "RTN", *FAST, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["recipe"]["passes"][0]["scheme"] == "w8a16"
    assert yaml.safe_load((out / "recipe.yaml").read_text())["passes"][0]["method"] == "rtn"


def test_the_cli_reference_in_the_docs_is_the_cli():
    """docs/cli.md's option tables are generated from the commands (sparsify.cli.write_reference)."""
    from sparsify.cli import reference

    docs = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    assert reference() in docs, (
        "docs/cli.md is stale: run python -c 'from sparsify.cli import write_reference; write_reference()'"
    )


def test_a_signal_as_the_handlers_are_put_back_is_one_line_not_a_silent_130(model_dir, monkeypatch):
    """A signal taken at the very call that restores the handlers raises there, outside the command's own
    error handling: it still ends with its one line and 128 + the signal."""
    import contextlib
    import signal

    from sparsify import interrupts

    @contextlib.contextmanager
    def late_signal():
        yield
        raise interrupts.Interrupted(signal.SIGTERM)

    monkeypatch.setattr(interrupts, "handle_signals", late_signal)
    r = run("inspect", str(model_dir("llama")))
    assert r.exit_code == 128 + signal.SIGTERM
    assert r.stderr.strip().splitlines()[-1] == "interrupted (SIGTERM) after the command finished"
