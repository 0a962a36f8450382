"""KL of a model's next-token distribution from a reference's: the maths, `eval --reference`, every run's
before/after (the input's log-probabilities kept in the cache of measurements), the report and the comparison."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T

from sparsify.algorithms.metrics import kl_stats
from sparsify.errors import SparsifyError
from sparsify.logprobs import KLMeter, LogprobWriter, SavedLogprobs
from sparsify.references import reference_root
from tests import zoo
from tests.test_cli import assert_user_error, run

RUN = ["--samples", "4", "--seq-len", "32", "--eval-seq-len", "64"]  # tiny calibration; held-out windows of 64


def _naive_kl(ref: torch.Tensor, lp: torch.Tensor) -> list[float]:
    """``sum_v p (log p - log q)`` per row, term by term in float64, skipping tokens the reference gives p = 0."""
    out = []
    for r, q in zip(ref.double().tolist(), lp.double().tolist(), strict=True):
        out.append(sum(math.exp(a) * (a - b) for a, b in zip(r, q, strict=True) if math.exp(a) > 0))
    return out


def test_kl_stats_matches_a_naive_sum():
    torch.manual_seed(0)
    ref = (torch.randn(2, 7, 50) * 3).log_softmax(-1)  # (B, L, V)
    lp = (torch.randn(2, 7, 50) * 3).log_softmax(-1)
    ref[0, 0, :10] = -math.inf  # tokens the reference rules out add nothing (not nan)
    ref[0, 0] = ref[0, 0].log_softmax(-1)
    kl, top1 = kl_stats(ref, lp)
    assert kl.shape == (14,) and top1.shape == (14,)
    assert kl.tolist() == pytest.approx(_naive_kl(ref.flatten(0, 1), lp.flatten(0, 1)), rel=1e-5, abs=1e-6)
    assert top1.tolist() == (ref.argmax(-1) == lp.argmax(-1)).flatten().tolist()
    assert kl_stats(ref, ref)[0].abs().max() < 1e-6 and bool(kl_stats(ref, ref)[1].all())
    # the reference's exact top-1, where given, is what the model's is compared with
    given = lp.argmax(-1)
    assert bool(kl_stats(ref, lp, given)[1].all())


def test_a_model_the_reference_rules_out_is_infinitely_far():
    ref = torch.tensor([[0.0, -math.inf]])  # p = (1, 0)
    lp = torch.tensor([[-math.inf, 0.0]])  # q = (0, 1)
    assert kl_stats(ref, lp)[0].item() == math.inf


def test_saved_logprobs_are_refused_for_other_windows_or_unfinished(tmp_path):
    windows = torch.arange(3 * 5).reshape(3, 5)
    saved = SavedLogprobs(tmp_path / "ref")
    lp = torch.randn(3, 4, 11).log_softmax(-1)
    writer = LogprobWriter(saved, windows, 11, "m")
    writer(lp)
    writer.close(complete=False)  # interrupted: no description, so never read
    with pytest.raises(SparsifyError, match="missing"):
        KLMeter(saved, windows)
    writer = LogprobWriter(saved, windows, 11, "m")
    writer(lp)
    writer.close()
    meter = KLMeter(saved, windows)
    meter(lp)
    result = meter.result()
    assert result["mean"] == pytest.approx(0, abs=1e-5) and result["top1"] == 1 and result["tokens"] == 12
    with pytest.raises(SparsifyError, match="other windows"):
        KLMeter(saved, windows + 1)
    with pytest.raises(SparsifyError, match="vocabulary"):
        KLMeter(saved, windows)(torch.randn(3, 4, 12).log_softmax(-1))
    saved.top1_path.write_bytes(b"")  # a file cut short
    with pytest.raises(SparsifyError, match="incomplete"):
        KLMeter(saved, windows)


def test_eval_of_a_model_against_itself_is_zero(model_dir):
    m = model_dir("llama")
    r = run("eval", m, "--reference", m, "--seq-len", "64", "--max-windows", "4", "--json")
    assert r.exit_code == 0, r.output
    kl = json.loads(r.stdout)["kl"]
    assert abs(kl["mean"]) < 1e-4 and abs(kl["p99"]) < 1e-4 and kl["top1"] == 1.0
    assert kl["tokens"] == 4 * 63 and kl["reference"] == str(m)
    text = run("eval", m, "--reference", m, "--seq-len", "64", "--max-windows", "4")
    assert "KL to reference" in text.stdout and "top-1 agreement 100.00%" in text.stdout


def test_a_run_reports_kl_and_eval_measures_it_from_the_recorded_input(model_dir, tmp_path):
    model, out, other = model_dir("llama"), tmp_path / "out", tmp_path / "other"
    r = run("prune", model, "-o", out, "--method", "wanda", "--sparsity", "0.5", *RUN)
    assert r.exit_code == 0, r.output
    assert "KL to input" in r.stdout  # the run's terminal summary
    kl = json.loads((out / "sparsify_report.json").read_text())["eval"]["kl"]
    assert kl["mean"] > 0 and kl["p99"] >= kl["mean"] and 0 <= kl["top1"] < 1
    assert kl["reference"] == str(model.absolute()) and kl["seq_len"] == 64 and kl["tokens"] == 16 * 63
    assert not [p for p in out.rglob("*") if "logprobs" in p.name], "the input's log-probabilities left in OUT"
    assert not list(tmp_path.glob(".out.*")), "work folder left"

    # `eval OUT` defaults to the input its report records, on the same held-out windows as the run
    e = run("eval", out, "--seq-len", "64", "--json")
    assert e.exit_code == 0, e.output
    measured = json.loads(e.stdout)["kl"]
    assert measured["reference"] == kl["reference"]
    assert measured["mean"] == pytest.approx(kl["mean"], rel=1e-3) and measured["top1"] == kl["top1"]

    # the report: its markdown headline, the HTML headline, and side by side with another output
    assert run("prune", model, "-o", other, "--method", "magnitude", "--sparsity", "0.7", *RUN).exit_code == 0
    page = run("report", out)
    assert "KL to input" in page.stdout, page.stdout
    assert "KL to the input" in run("report", out, "--format", "html").stdout
    compare = run("report", out, "--compare", other)
    assert run("report", out, other).stdout == compare.stdout  # several outputs as arguments: the same comparison
    header = next(line for line in compare.stdout.splitlines() if line.startswith("| output"))
    assert "| perplexity | KL to input |" in header, compare.stdout
    assert "top-1" in compare.stdout.split(header)[1]
    assert "<th class='num'>KL to input</th>" in run("report", out, "--compare", other, "--format", "html").stdout


@pytest.mark.slow
def test_a_resumed_run_measures_the_input_again_when_its_cached_logprobs_are_gone(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSIFY_CACHE", str(tmp_path / "cache"))
    model = zoo.save("llama", tmp_path / "llama4", layers=4)
    whole, out = tmp_path / "whole", tmp_path / "out"
    assert run("prune", model, "-o", whole, "--sparsity", "0.5", *RUN).exit_code == 0
    args = ["prune", model, "-o", out, "--sparsity", "0.5", *RUN]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    root = Path(__file__).resolve().parents[1]
    killed = subprocess.run([sys.executable, "-m", "tests.faults", "kill@2", "--", *map(str, args)], cwd=root,
                            env=env, capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    saved = list(reference_root().glob("*/logprobs*"))
    assert len(saved) == 3, saved  # the input's, measured once (by the first run) and kept in the cache
    for f in saved:  # the cache cleared (or evicted) while the run was down
        f.unlink()
    r = run(*args, "--resume")
    assert r.exit_code == 0, r.output
    report = json.loads((out / "sparsify_report.json").read_text())
    assert any("resumed at layer" in n for n in report["notes"]), report["notes"]
    kl, expected = report["eval"]["kl"], json.loads((whole / "sparsify_report.json").read_text())["eval"]["kl"]
    assert kl["mean"] > 0 and kl["mean"] == pytest.approx(expected["mean"], rel=1e-4)
    assert kl["top1"] == expected["top1"] and kl["tokens"] == expected["tokens"]


def test_logprobs_lost_before_the_output_is_measured_give_a_note_not_a_number(model_dir, tmp_path, monkeypatch):
    from sparsify.pipeline import flow as pipeline  # the module that calls it

    monkeypatch.setenv("SPARSIFY_CACHE", str(tmp_path / "cache"))

    stages = pipeline._run_stages_with

    def stages_then_lose_them(world, md, run_, opts, work):
        done = stages(world, md, run_, opts, work)
        for f in reference_root().glob("*/logprobs*"):
            f.unlink()
        return done

    monkeypatch.setattr(pipeline, "_run_stages_with", stages_then_lose_them)
    r = run("prune", model_dir("llama"), "-o", tmp_path / "out", "--sparsity", "0.5", *RUN, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert "kl" not in report["eval"] and report["eval"]["after"] > 1
    assert any(n.startswith("KL to the input not measured: ") and "missing" in n for n in report["notes"])


def test_a_recorded_input_that_is_gone_is_a_note(tmp_path):
    model = zoo.save("llama", tmp_path / "model")
    out = tmp_path / "out"
    assert run("prune", model, "-o", out, "--sparsity", "0.5", *RUN).exit_code == 0
    shutil.rmtree(model)
    r = run("eval", out, "--seq-len", "64", "--max-windows", "2", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert "kl" not in result and result["perplexity"] > 1
    assert any("KL not measured" in n and str(model) in n for n in result["notes"]), result
    text = run("eval", out, "--seq-len", "64", "--max-windows", "2")
    assert text.exit_code == 0 and "note: KL not measured" in text.stdout


def test_bad_references_are_one_line(model_dir, tmp_path):
    m = model_dir("llama")
    missing = tmp_path / "no-such-model"
    assert_user_error(run("eval", m, "--reference", missing, "--seq-len", "64"), None, "--reference", str(missing))
    wide = tmp_path / "wide"
    config = T.LlamaConfig(vocab_size=zoo.VOCAB + 8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    T.LlamaForCausalLM(config).save_pretrained(wide)
    assert_user_error(run("eval", m, "--reference", wide, "--seq-len", "64"), None, str(wide), "vocabulary")
    assert_user_error(run("eval", model_dir("bert"), "--reference", m), None, "--reference")
