"""One evaluation protocol: the demo, `sparsify eval` and every run's before/after read the same windows, say which,
and measure the input once per model and protocol (the cache of measurements, sparsify.references)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import sparsify.evaluate as evaluate_mod
from sparsify.data import BUILTIN_EVAL
from sparsify.evaluate import DEFAULT_EVAL_WINDOWS, eval_window_count, evaluate
from sparsify.pipeline import Options, compress
from sparsify.recipe import parse_recipe
from sparsify.references import cache_contents, evict, open_reference, reference_root
from tests import zoo
from tests.test_cli import assert_user_error, run

RUN = ["--samples", "4", "--seq-len", "32", "--eval-seq-len", "64"]


@pytest.fixture
def own_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SPARSIFY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def loads(monkeypatch) -> list[Path]:
    """Every model folder evaluation loads, in order."""
    seen: list[Path] = []
    real = evaluate_mod.load_causal_lm

    def load(path, *args, **kwargs):
        seen.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(evaluate_mod, "load_causal_lm", load)
    return seen


def test_one_rule_for_the_window_count():
    assert eval_window_count(None) == eval_window_count(BUILTIN_EVAL) == DEFAULT_EVAL_WINDOWS
    assert eval_window_count("my.txt") is None  # the user's own text: all of it
    assert eval_window_count(BUILTIN_EVAL, 3) == eval_window_count("my.txt", 3) == 3


def test_the_demo_a_run_and_eval_measure_the_same_windows(tmp_path, own_cache):
    """The demo's run (eval_data = the embedded text), a plain CLI run and `sparsify eval` report one number for the
    input, on the same windows (digest), labelled alike; the demo read 32 windows where eval read 16."""
    model = zoo.save("llama", tmp_path / "model")
    recipe = parse_recipe(
        {"calibration": {"samples": 4, "seq_len": 32}, "passes": [{"type": "prune", "sparsity": 0.5}]}, "demo"
    )
    demo = compress(model, recipe, tmp_path / "demo", Options(eval_data=BUILTIN_EVAL, eval_seq_lens=(64,)))
    assert run("prune", model, "-o", tmp_path / "cli", "--sparsity", "0.5", *RUN).exit_code == 0
    cli = json.loads((tmp_path / "cli" / "sparsify_report.json").read_text())
    e = run("eval", model, "--seq-len", "64", "--json")
    assert e.exit_code == 0, e.output
    measured = json.loads(e.stdout)
    assert demo["eval"]["windows"] == cli["eval"]["windows"] == measured["windows"] == DEFAULT_EVAL_WINDOWS
    assert demo["eval"]["digest"] == cli["eval"]["digest"] == measured["digest"]
    assert demo["eval"]["text"] == cli["eval"]["text"] == measured["text"] == BUILTIN_EVAL
    assert demo["eval"]["before"] == cli["eval"]["before"] == measured["perplexity"]
    plain = run("eval", model, "--seq-len", "64")
    assert f"{BUILTIN_EVAL}, {DEFAULT_EVAL_WINDOWS} windows × 64 tokens" in plain.stdout, plain.stdout


def test_the_input_is_measured_once_per_model_and_protocol(tmp_path, own_cache, loads):
    """A second recipe on the same model, `eval MODEL` and `eval OUT` (KL to the recorded input) take the input's
    measurement from the cache: the input is loaded for evaluation once in all, and every number agrees."""
    model = zoo.save("llama", tmp_path / "model")
    first, second = tmp_path / "first", tmp_path / "second"
    r = run("prune", model, "-o", first, "--method", "wanda", "--sparsity", "0.5", *RUN)
    assert r.exit_code == 0, r.output
    assert "note: the input's perplexity and log-probabilities" in r.stderr and "sparsify cache --clear" in r.stderr
    assert loads.count(model) == 1
    r = run("prune", model, "-o", second, "--method", "magnitude", "--sparsity", "0.6", *RUN)
    assert r.exit_code == 0, r.output
    assert loads.count(model) == 1, "the input measured again"
    a, b = (json.loads((p / "sparsify_report.json").read_text()) for p in (first, second))
    assert a["eval"]["before"] == b["eval"]["before"] and a["eval"]["digest"] == b["eval"]["digest"]
    assert "kl" in b["eval"] and b["eval"]["kl"]["mean"] > 0
    assert any("taken from the cache" in n for n in b["notes"]), b["notes"]
    assert not any("taken from the cache" in n for n in a["notes"])

    e = run("eval", model, "--seq-len", "64", "--json")
    assert json.loads(e.stdout)["perplexity"] == a["eval"]["before"] and json.loads(e.stdout)["cached"]
    e = run("eval", second, "--seq-len", "64", "--json")
    assert e.exit_code == 0, e.output
    kl = json.loads(e.stdout)["kl"]
    assert loads.count(model) == 1, "eval OUT measured the input again"
    assert kl["reference_perplexity"] == a["eval"]["before"]
    assert kl["mean"] == pytest.approx(b["eval"]["kl"]["mean"], rel=1e-4)

    # the same bytes in another folder are the same model; the report names this run's input as the KL reference
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    r = run("prune", copy, "-o", tmp_path / "from-copy", "--sparsity", "0.5", *RUN, "--json")
    assert r.exit_code == 0 and loads.count(copy) == 0, r.output
    assert json.loads(r.stdout)["eval"]["kl"]["reference"] == str(copy.absolute())

    # another protocol (other windows) is another measurement
    r = run("prune", model, "-o", tmp_path / "third", "--sparsity", "0.5", *RUN[:4], "--eval-seq-len", "32")
    assert r.exit_code == 0, r.output
    assert loads.count(model) == 2


def test_entries_are_held_while_measured_and_read(own_cache):
    first = open_reference("k")
    assert first is not None and first.perplexity() is None  # to be measured, held exclusively
    assert open_reference("k") is None  # another process meanwhile measures elsewhere
    assert open_reference("k", create=False) is None
    first.store({"perplexity": 7.5})
    readers = [open_reference("k"), open_reference("k", create=False)]  # finished: shared by readers
    assert all(r is not None and r.perplexity()["perplexity"] == 7.5 for r in readers)
    first.release()
    (first.dir / "logprobs").write_bytes(b"x" * 1000)
    other = open_reference("j")
    other.store({"perplexity": 3.0})
    other.release()
    evict(budget=0)  # every entry over budget: only those no process holds go
    assert not (reference_root() / "j").exists() and (reference_root() / "k").exists()
    for r in readers:
        r.release()
    evict(budget=0)
    assert not (reference_root() / "k").exists()
    assert open_reference("k", usable=lambda r: False).perplexity() is None  # present but unusable: measured again


def test_the_progress_line_says_what_it_measures(tmp_path):
    model = zoo.save("llama", tmp_path / "model")
    seen: list[str] = []

    class Recorder:
        def track(self, items, total, description):
            seen.append(description)
            yield from items

    evaluate(model, None, 64, eval_window_count(None), progress=Recorder(), label="the input")
    assert seen == [f"perplexity of the input ({BUILTIN_EVAL}, 16 windows × 64 tokens), batches"]


def test_the_cache_command_lists_and_clears(tmp_path, own_cache):
    model = zoo.save("llama", tmp_path / "model")
    assert run("prune", model, "-o", tmp_path / "out", "--sparsity", "0.5", *RUN).exit_code == 0
    listed = json.loads(run("cache", "--json").stdout)
    parts = {p["part"]: p for p in listed["parts"]}
    assert parts["reference"]["entries"] == 1 and parts["reference"]["bytes"] > 0
    assert "sparsify cache --clear" in run("cache").stdout
    cleared = run("cache", "--clear", "--json")
    assert cleared.exit_code == 0, cleared.output
    assert json.loads(cleared.stdout)["freed_bytes"] == parts["reference"]["bytes"]
    assert not [p for p in cache_contents() if p["part"] == "reference" and p["entries"]]
    assert_user_error(run("cache", "--all"), None, "--all goes with --clear")


def test_the_demo_names_its_input_and_what_it_was():
    from sparsify.demo import next_step

    line = next_step({"model": "/c/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"})
    assert "4-bit Q4_1" in line and "dequantized" in line
    assert "sparsify quantize /c/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf -o w4 --scheme w4a16" in line


def test_eval_heldout_reads_the_same_16_windows(tmp_path):
    model = zoo.save("llama", tmp_path / "model")
    plain, named = (
        json.loads(run("eval", model, *d, "--seq-len", "64", "--json").stdout) for d in ([], ["--data", "heldout"])
    )
    assert plain["windows"] == named["windows"] == DEFAULT_EVAL_WINDOWS and plain["digest"] == named["digest"]


def test_a_cache_that_cannot_take_the_measurement_is_not_needed(tmp_path, own_cache, monkeypatch):
    """No room on the cache's disk, or a cache folder that cannot be written: the input is measured into the work
    folder as before the cache, KL and all; nothing is left half-made in the cache."""
    from sparsify.logprobs import SavedLogprobs
    from sparsify.pipeline import measure as pipeline  # the module that calls open_reference

    model = zoo.save("llama", tmp_path / "model")
    room = SavedLogprobs.space_problem

    def no_room_in_the_cache(self, windows, vocab):
        return "no room" if str(self.path).startswith(str(own_cache)) else room(self, windows, vocab)

    monkeypatch.setattr(SavedLogprobs, "space_problem", no_room_in_the_cache)
    r = run("prune", model, "-o", tmp_path / "a", "--sparsity", "0.5", *RUN, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["eval"]["kl"]["mean"] > 0
    assert not list(reference_root().glob("*/perplexity.json"))
    monkeypatch.undo()

    def unwritable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(own_cache))

    monkeypatch.setattr(pipeline, "open_reference", unwritable)
    r = run("prune", model, "-o", tmp_path / "b", "--sparsity", "0.5", *RUN, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["eval"]["kl"]["mean"] > 0


def test_remote_code_models_are_not_cached(tmp_path, own_cache):
    model = zoo.save("llama", tmp_path / "model")
    r = run("prune", model, "-o", tmp_path / "a", "--sparsity", "0.5", *RUN, "--trust-remote-code", "--json")
    assert r.exit_code == 0, r.output
    assert "kl" in json.loads(r.stdout)["eval"] and not list(reference_root().glob("*/perplexity.json"))


def test_clear_leaves_a_converted_model_a_run_is_reading(own_cache):
    from sparsify.checkpoint.source import hold_cached
    from sparsify.references import clear_cache

    folder = own_cache / "gguf" / "model-0123"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    held = hold_cached(folder)
    freed, busy = clear_cache()
    assert folder.is_dir() and busy == [str(folder)] and freed == 0
    held.close()
    freed, busy = clear_cache()
    assert not folder.exists() and busy == [] and freed == 100


def test_log_probabilities_are_finished_when_measured_inside_a_callers_handler(tmp_path):
    """evaluate() said the writing failed whenever its caller was handling an exception (sys.exc_info)."""
    from sparsify.logprobs import SavedLogprobs

    model = zoo.save("llama", tmp_path / "model")
    saved = SavedLogprobs(tmp_path / "logprobs")
    try:
        raise PermissionError("the cache cannot be written")
    except PermissionError:
        evaluate(model, None, 64, 2, save_logprobs=saved)
    assert saved.meta_path.is_file() and saved.meta()["positions"] == 63
