"""Heal: the fit lowers each layer's loss, what compression decided survives it (zeros and N:M patterns, shapes,
quantization grids, experts), the output reloads as the model healed in memory, bad orders and budgets are
refused before work, and an interrupted heal resumes to the same bytes."""

from __future__ import annotations

import copy
import json
import signal

import pytest
import torch
import transformers as T
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from safetensors.torch import load_file
from torch import nn

import sparsify
from sparsify.algorithms.quant import PerGroup, QuantArgs, choose_qparams, quantize
from sparsify.algorithms.reconstruct import cosine_lr, fit_block
from sparsify.arch import lookup
from sparsify.distributed import SINGLE
from sparsify.errors import SparsifyError
from sparsify.passes import build_pass
from sparsify.passes.trainable import TrainableLayer
from sparsify.pipeline import compress_model
from sparsify.recipe import parse_recipe
from sparsify.report import read_report
from sparsify.runtime.quantized import QuantizedLinear, QuantScheme
from tests.test_cli import CALIB as CLI_CALIB
from tests.test_cli import FAST, assert_user_error, run
from tests.test_guarantees import _fault, _weights, deep  # noqa: F401 - deep is a fixture
from tests.test_quantize import _outputs, _tokens
from tests.zoo import compress

CALIB = {"samples": 8, "seq_len": 32, "batch_size": 4}
HEAL = {"type": "heal", "steps": 30, "precision": "fp32"}  # auto: fp32 on these tiny shapes anyway
CASES = {
    "sparsegpt-2:4": [{"type": "prune", "method": "sparsegpt", "pattern": "2:4"}],
    "flap-channels": [
        {"type": "prune", "structured": "channels", "ratio": 0.25, "metric": "flap", "bias_compensation": True}
    ],
    "w4a16-rtn": [{"type": "quantize", "scheme": "w4a16", "method": "rtn", "group_size": 32}],
    "w8a8": [{"type": "quantize", "scheme": "w8a8", "method": "rtn"}],
    "moe": [{"type": "moe", "experts": 4, "top_k": 2}],
    "wanda-then-w4a16": [
        {"type": "prune", "method": "wanda", "sparsity": 0.5},
        {"type": "quantize", "scheme": "w4a16", "method": "rtn", "group_size": 32},
    ],
}


def _recipe(passes: list[dict], calibration: dict | None = None):
    return parse_recipe({"calibration": calibration or CALIB, "passes": passes})


def _heal_records(report: dict) -> list[dict]:
    return [r for r in report["layers"] if r.get("kind") == "heal"]


@pytest.mark.parametrize("case", list(CASES))
def test_heal_lowers_the_loss_keeps_what_compression_decided_and_reloads(case, model_dir, tmp_path):
    src = model_dir("llama")
    plain, healed = tmp_path / "plain", tmp_path / "healed"
    compress(src, _recipe(CASES[case]), plain)
    report = compress(src, _recipe([*CASES[case], HEAL]), healed)
    records = _heal_records(report)
    assert [r["layer"] for r in records] == [0, 1]
    assert any(r["status"] == "healed" for r in records)
    for r in records:  # a fit that would not help is undone: the loss never goes up
        assert r["loss_after"] < r["loss_before"] if r["status"] == "healed" else r["loss_after"] == r["loss_before"]

    # the same architecture: config and every tensor's name, shape and dtype
    def cfg(p):
        return {k: v for k, v in json.loads((p / "config.json").read_text()).items() if k != "transformers_version"}

    assert cfg(healed) == cfg(plain)
    a, b = load_file(plain / "model.safetensors"), load_file(healed / "model.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (v.shape, v.dtype) for k, v in b.items()}
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert any(".layers." in k for k in changed)  # healing did something
    assert all(".layers." in k for k in changed)  # embeddings, final norm and head are not its business
    for k, w in a.items():
        if k.endswith(".weight") and w.dim() == 2 and w.is_floating_point() and ".layers." in k:
            assert (b[k] == 0).sum() >= (w == 0).sum(), k  # as sparse as compression left it
            if ".layers.0." in k:  # layer 0 is pruned on the same inputs in both runs: the same zeros, still zero
                assert ((w == 0) <= (b[k] == 0)).all(), k
            if case == "sparsegpt-2:4" and k.endswith(("_proj.weight",)):
                assert ((b[k].reshape(-1, 4) == 0).sum(1) >= 2).all(), k  # the 2:4 pattern holds
        if k.endswith("weight_scale"):
            assert (torch.sign(b[k]) == torch.sign(w)).all(), k  # a scale keeps its sign
        if k.endswith("weight_packed"):
            shape = torch.Size(b[k.replace("weight_packed", "weight_shape")].tolist())
            codes_a, codes_b = unpack_from_int32(w, 4, shape), unpack_from_int32(b[k], 4, shape)
            assert codes_b.min() >= -8 and codes_b.max() <= 7
            if case == "wanda-then-w4a16" and ".layers.0." in k:
                assert ((codes_a == 0) <= (codes_b == 0)).all(), k  # pruned zeros survive quantization and heal
        if k.endswith(".weight") and w.dtype == torch.int8:
            assert b[k].min() >= -128 and b[k].max() <= 127
    # reloading gives the model healed in memory
    ids = _tokens(src)[:2]
    model = T.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    compress_model(model, _recipe([*CASES[case], HEAL]), _tokens(src))
    ours = sparsify.load(healed, kernel="reference")  # the arithmetic the in-memory model uses
    torch.testing.assert_close(_outputs(ours, ids), _outputs(model, ids), rtol=0, atol=1e-5)


def test_a_fit_that_does_not_help_leaves_the_layer_exactly_as_compressed(model_dir, tmp_path):
    src = model_dir("llama")
    step = CASES["w4a16-rtn"]
    compress(src, _recipe(step), tmp_path / "plain")
    report = compress(src, _recipe([*step, {"type": "heal", "steps": 5, "lr": 50.0}]), tmp_path / "wild")
    assert {r["status"] for r in _heal_records(report)} == {"kept as compressed"}
    assert (
        load_file(tmp_path / "plain" / "model.safetensors").keys()
        == load_file(tmp_path / "wild" / "model.safetensors").keys()
    )
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "wild" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_model_target_fits_the_dense_models_hidden_states(model_dir, tmp_path):
    src = model_dir("llama")
    step = CASES["sparsegpt-2:4"]
    layer = compress(src, _recipe([*step, {**HEAL, "target": "layer"}]), tmp_path / "layer")
    model = compress(src, _recipe([*step, {**HEAL, "target": "model"}]), tmp_path / "model")
    a, b = _heal_records(layer), _heal_records(model)
    assert a[0]["loss_before"] == pytest.approx(b[0]["loss_before"])  # layer 0: both teachers are the same
    assert a[1]["loss_before"] != pytest.approx(b[1]["loss_before"])  # later: the dense model's own path
    assert all(r["loss_after"] < r["loss_before"] for r in b)


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: the LM head tied to the embeddings
def test_the_report_measures_the_model_as_it_was_before_healing(family, model_dir, tmp_path):
    """Magnitude pruning needs no data, so each layer before its heal is the plain run's layer: the perplexity
    the healing run reports before healing is the plain run's perplexity after (the same windows)."""
    from sparsify.pipeline import Options
    from sparsify.pipeline import compress as measured
    from sparsify.report import render_html, summary_rows

    src, step = model_dir(family), [{"type": "prune", "method": "magnitude", "pattern": "2:4"}]
    opts = Options(eval_seq_lens=(32,), eval_max_windows=6)
    plain = measured(src, _recipe(step), tmp_path / "plain", opts)
    healed = measured(src, _recipe([*step, HEAL]), tmp_path / "healed", opts)
    assert "before_recovery" not in plain["eval"]
    before = healed["eval"]["before_recovery"]
    assert before["step"] == "healing" and before["perplexity"] == pytest.approx(plain["eval"]["after"], rel=1e-5)
    assert healed["eval"]["before"] == plain["eval"]["before"]
    assert any(f"{before['perplexity']:.3f} before healing" in text for _, text in summary_rows(healed))
    assert "before healing" in render_html(healed) and "before healing" not in render_html(plain)


def test_samples_and_windows_bound_the_data(model_dir, tmp_path):
    src = model_dir("llama")
    report = compress(src, _recipe([*CASES["sparsegpt-2:4"], {**HEAL, "samples": 3, "windows": 1}]), tmp_path / "out")
    assert all(r["status"] == "healed" for r in _heal_records(report))


def test_a_bf16_fit_lowers_the_loss_and_keeps_the_pattern(model_dir, tmp_path):
    src = model_dir("llama")
    report = compress(src, _recipe([*CASES["sparsegpt-2:4"], {**HEAL, "precision": "bf16"}]), tmp_path / "out")
    records = _heal_records(report)
    assert {r["precision"] for r in records} == {"bf16"}
    assert all(r["status"] == "healed" and r["loss_after"] < r["loss_before"] for r in records)
    for name, W in load_file(tmp_path / "out" / "model.safetensors").items():
        if name.endswith("proj.weight"):
            assert W.dtype == torch.float32  # trained under autocast, stored as the model's dtype
            assert ((W.reshape(-1, 4) != 0).sum(-1) <= 2).all(), name  # 2:4 holds


@pytest.mark.parametrize(("speedup", "chosen"), [(2.0, "bf16"), (1.1, "fp32"), (0.03, "fp32")])
def test_precision_auto_is_measured_once_and_restored_on_resume(speedup, chosen, monkeypatch):
    from sparsify.passes import heal, trainable

    monkeypatch.setattr(trainable, "bf16_speedup", lambda n_in, n_out, device: speedup)
    monkeypatch.setattr(trainable, "has_bf16_units", lambda device: True)
    layers = [nn.Sequential(nn.Linear(576, 1536))]
    runner = type("Runner", (), {"layers": layers, "device": torch.device("cpu"), "world": SINGLE})()
    p = heal.HealPass(heal.HealConfig(), 1)
    p.prepare(runner)
    assert p.decisions() == {"precision": chosen}
    resumed = heal.HealPass(heal.HealConfig(), 1)
    resumed.restore(p.decisions())  # a resumed run takes the decision back, it does not measure again
    assert resumed.precision == chosen
    fixed = heal.HealPass(heal.HealConfig(precision="fp32"), 1)
    fixed.prepare(runner)
    assert fixed.decisions() == {"precision": "fp32"}
    monkeypatch.setattr(trainable, "has_bf16_units", lambda device: False)  # AVX2 only: not even measured
    monkeypatch.setattr(trainable, "bf16_speedup", lambda n_in, n_out, device: pytest.fail("measured"))
    plain = heal.HealPass(heal.HealConfig(), 1)
    plain.prepare(runner)
    assert plain.decisions() == {"precision": "fp32"}
    monkeypatch.setattr(trainable, "has_bf16_units", lambda device: True)
    runner.layers = [nn.Sequential(nn.Linear(64, 128))]  # a tiny model: not measured either
    tiny = heal.HealPass(heal.HealConfig(), 1)
    tiny.prepare(runner)
    assert tiny.decisions() == {"precision": "fp32"}


@pytest.mark.parametrize(
    ("passes", "keeps"),
    [
        ([{"type": "prune", "method": "wanda", "sparsity": 0.5}], True),
        ([{"type": "prune", "structured": "channels", "ratio": 0.25}], False),  # removed, not zeroed
        ([{"type": "quantize", "scheme": "w4a16", "method": "rtn", "group_size": 32}], False),
    ],
    ids=["unstructured", "structured", "quantize"],
)
@pytest.mark.parametrize("recovery", ["heal", "distill"])
def test_recovery_keeps_quantized_zeros_only_after_a_pass_that_leaves_zeros(passes, keeps, recovery):
    """A quantized weight whose code is 0 is a pruning decision only when a pass before left zeros; otherwise
    it is an ordinary small weight that rounding sent to 0, free to train."""
    arch = lookup("llama")
    earlier = [build_pass(step, i, arch) for i, step in enumerate(_recipe(passes).passes)]
    p = build_pass(_recipe([*passes, {"type": recovery}]).passes[-1], len(passes), arch)
    p.after(earlier)
    assert p.keep_quantized_zeros is keeps


# ----------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("passes", "message"),
    [
        ([{"type": "heal"}], "nothing to heal"),
        ([{"type": "heal"}, {"type": "prune", "method": "magnitude", "sparsity": 0.5}], "nothing to heal"),
        ([{"type": "attention", "pattern": "sliding-window", "window": 16}, {"type": "heal"}], "nothing to heal"),
    ],
    ids=["alone", "before", "after-config-only"],
)
def test_heal_with_nothing_to_heal_is_refused_before_any_work(passes, message, model_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SparsifyError, match=message):
        compress(model_dir("llama"), _recipe(passes), out)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--heal-steps", "0"], "--heal-steps"),
        (["--heal-lr", "0"], "--heal-lr"),
        (["--heal-windows", "0"], "--heal-windows"),
        (["--heal-target", "teacher"], "--heal-target"),
    ],
)
def test_cli_heal_budget_errors_name_the_flag(flags, named, model_dir, tmp_path):
    out = tmp_path / "out"
    r = run("prune", model_dir("llama"), "-o", out, "--method", "magnitude", "--sparsity", "0.5", *flags)
    assert r.exit_code == 2
    assert_user_error(r, out, named)


def test_cli_heal_runs_after_the_commands_pass(model_dir, tmp_path):
    out = tmp_path / "out"
    r = run("quantize", model_dir("llama"), "-o", out, "--scheme", "w4a16", "--group-size", "32", "--method", "rtn",
            *FAST, "--heal", "--heal-steps", "5", "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    recipe = (out / "recipe.yaml").read_text()
    assert "type: heal" in recipe and "steps: 5" in recipe
    assert json.loads(r.stdout)["totals"]["healed_layers"] == 2


@pytest.mark.slow
def test_an_interrupted_heal_resumes_to_the_same_bytes_and_reports_the_perplexity_before_healing(deep, tmp_path):  # noqa: F811
    """Killed in the sweep, after it (before the perplexity before healing is measured) and after the stage is
    complete: each resumed run writes the whole run's bytes and reports the whole run's perplexity before healing
    (what the probe windows became is saved with each checkpoint, the perplexity with the stage)."""
    args = [
        "prune",
        deep,
        "--method",
        "wanda",
        "--sparsity",
        "0.5",
        *CLI_CALIB,  # with the perplexity: measured before healing too
        "--eval-seq-len",
        "32",
        "--heal",
        "--heal-steps",
        "5",
        "--heal-target",
        "model",
        "--heal-precision",
        "fp32",
    ]  # fmt: skip (auto would measure in each run)
    reference = tmp_path / "reference"
    assert run(*args[:1], args[1], "-o", reference, *args[2:]).exit_code == 0
    whole = read_report(reference)
    assert whole["eval"]["before_recovery"]["perplexity"] > 0
    for fault in ("kill@2", "killin@perplexity_of_hidden", "killin@check_written"):
        out = tmp_path / fault.replace("@", "-")
        r = _fault(fault, *args[:2], "-o", out, *args[2:])
        assert r.returncode == -signal.SIGKILL and not out.exists(), fault
        r = _fault("run", *args[:2], "-o", out, *args[2:], "--resume")
        assert r.returncode == 0, r.stderr
        assert _weights(out) == _weights(reference), fault
        resumed = read_report(out)
        assert resumed["eval"]["before_recovery"] == whole["eval"]["before_recovery"], fault
        assert not any("not measured" in n for n in resumed["notes"]), (fault, resumed["notes"])


# ------------------------------------------------------------------------------------------- pieces


def test_cosine_schedule_warms_up_then_decays_to_zero():
    assert cosine_lr(0, 100, 10) == pytest.approx(0.1)
    assert cosine_lr(9, 100, 10) == pytest.approx(1.0)
    assert cosine_lr(10, 100, 10) == pytest.approx(1.0)
    assert cosine_lr(55, 100, 10) == pytest.approx(0.5)
    assert cosine_lr(100, 100, 10) == pytest.approx(0.0, abs=1e-12)


def test_fit_block_fits_a_masked_linear_map_and_keeps_its_zeros():
    g = torch.Generator().manual_seed(0)
    teacher = nn.Linear(16, 8, bias=False)
    student = nn.Linear(16, 8, bias=False)
    with torch.no_grad():
        teacher.weight.copy_(torch.randn(8, 16, generator=g))
        student.weight.copy_(teacher.weight * (torch.rand(8, 16, generator=g) > 0.5))  # half pruned, no refit
    zeros = student.weight == 0
    mix = torch.eye(16) + 0.8 * torch.randn(16, 16, generator=g)  # correlated inputs: kept weights can compensate
    X = [torch.randn(4, 5, 16, generator=g) @ mix for _ in range(3)]  # (windows, seq, in) per batch
    Y = [teacher(x).detach() for x in X]
    layer = nn.Sequential(student)
    t = TrainableLayer(layer, lr=0.02)
    result = fit_block(lambda b, rows: layer(X[b][rows]), Y, t.groups, 200, 2, g, project=t.project)
    t.finish()
    assert result.loss_after < result.loss_before
    assert (student.weight[zeros] == 0).all() and not student.weight.requires_grad
    # the optimum with those zeros is the least-squares fit of the kept weights: the fit approaches it
    Xf = torch.cat([x.reshape(-1, 16) for x in X])  # (n, in)
    Yf = torch.cat([y.reshape(-1, 8) for y in Y])  # (n, out)
    best = torch.zeros(8, 16)
    for r in range(8):
        keep = ~zeros[r]
        best[r, keep] = torch.linalg.lstsq(Xf[:, keep], Yf[:, r : r + 1]).solution[:, 0]
    floor = float((Xf @ best.T - Yf).pow(2).mean() / Yf.pow(2).mean())
    assert result.loss_after < floor + 0.5 * (result.loss_before - floor)


def test_fit_block_under_bf16_autocast_fits_as_well_as_fp32_and_trains_fp32_parameters():
    g = torch.Generator().manual_seed(1)
    teacher, start = nn.Linear(32, 16), nn.Linear(32, 16)
    with torch.no_grad():
        for p in (*teacher.parameters(), start.bias):  # seeded here, whatever ran before
            p.copy_(torch.randn(p.shape, generator=g) / 32**0.5)
        start.weight.copy_(teacher.weight * (torch.rand(16, 32, generator=g) > 0.5))
    mix = torch.eye(32) + 0.8 * torch.randn(32, 32, generator=g)  # correlated inputs: kept weights can compensate
    X = [torch.randn(4, 8, 32, generator=g) @ mix for _ in range(2)]  # (windows, seq, in) per batch
    Y = [teacher(x).detach() for x in X]
    results = {}
    for dtype in (None, torch.bfloat16):
        student = copy.deepcopy(start)
        zeros = student.weight == 0
        t = TrainableLayer(nn.Sequential(student), lr=0.02)
        results[dtype] = fit_block(lambda b, rows, s=student: s(X[b][rows]), Y, t.groups, 150, 2,
                                   torch.Generator().manual_seed(0), project=t.project, autocast=dtype)  # fmt: skip
        t.finish()
        assert student.weight.dtype == torch.float32 and (student.weight[zeros] == 0).all()
    fp32, bf16 = results[None], results[torch.bfloat16]
    assert bf16.loss_before == fp32.loss_before  # measured in fp32 either way
    assert fp32.loss_after < 0.7 * fp32.loss_before  # the kept weights compensate for much of the pruning
    assert bf16.loss_before - bf16.loss_after > 0.9 * (fp32.loss_before - fp32.loss_after)


def test_a_quantized_linear_trains_on_its_grid_and_comes_back_quantized():
    g = torch.Generator().manual_seed(1)
    args = QuantArgs(4, True, PerGroup(8), signed_scale=True)
    W = torch.randn(6, 16, generator=g)
    scale, zp = choose_qparams(W, args)
    q = quantize(W, scale, zp, args)
    q[0, :4] = 0  # "pruned" before quantization
    m = QuantizedLinear.from_quantized(q, scale, zp, QuantScheme(args, None))
    layer = nn.Sequential(m)
    X = [torch.randn(4, 3, 16, generator=g)]
    Y = [(X[0] @ W.T).detach()]
    t = TrainableLayer(layer, lr=0.02, keep_quantized_zeros=True)
    result = fit_block(lambda b, rows: layer(X[b][rows]), Y, t.groups, 60, 2, g, project=t.project)
    t.finish()
    new = layer[0]
    assert isinstance(new, QuantizedLinear) and result.loss_after < result.loss_before
    codes = new.codes()
    assert codes.min() >= -8 and codes.max() <= 7 and (codes[0, :4] == 0).all()
    assert (torch.sign(new.weight_scale) == torch.sign(scale)).all()
    with torch.no_grad():
        assert float((new(X[0]) - Y[0]).pow(2).mean() / Y[0].pow(2).mean()) == pytest.approx(
            result.loss_after, rel=1e-4
        )


def test_a_saved_probe_is_taken_back_only_for_the_same_windows():
    """What the perplexity windows became is reused on resume only for the windows it was saved for: another
    evaluation text, window length or count measures nothing (the report says so) rather than mixing runs."""
    from sparsify.calibration import resumed_probe

    tokens = [torch.arange(8).reshape(2, 4), torch.arange(8, 12).reshape(1, 4)]
    saved = [(t.clone(), torch.randn(*t.shape, 3)) for t in tokens]
    back = resumed_probe(tokens, saved, torch.device("cpu"))
    assert back is not None and all(torch.equal(h, s) for (_, h), (_, s) in zip(back, saved, strict=True))
    assert resumed_probe([tokens[0], tokens[1] + 1], saved, torch.device("cpu")) is None  # another text
    assert resumed_probe(tokens[:1], saved, torch.device("cpu")) is None  # another count
    assert resumed_probe([t[:, :2] for t in tokens], saved, torch.device("cpu")) is None  # another length
    assert (
        resumed_probe(None, saved, torch.device("cpu")) is None
        and resumed_probe(tokens, None, torch.device("cpu")) is None
    )
