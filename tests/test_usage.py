"""A new user's run: version, devices, the Python API, the model card, remote code that travels or is refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

import sparsify
from sparsify.errors import SparsifyError
from tests.test_cli import CALIB, FAST, assert_user_error, run

PRUNE = ["--method", "wanda", "--sparsity", "0.5", *FAST]
PRUNE_EVAL = ["--method", "wanda", "--sparsity", "0.5", *CALIB]


def test_version():
    r = run("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"sparsify {sparsify.__version__}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_a_device_that_is_not_here_is_one_line(model_dir, tmp_path):
    for device, fragment in (("cuda", "no CUDA device"), ("tpu", "unknown device"), ("cuda:x", "unknown device")):
        out = tmp_path / "out"
        assert_user_error(run("prune", model_dir("llama"), "-o", out, *PRUNE, "--device", device), out, fragment)
    assert_user_error(run("eval", model_dir("llama"), "--device", "cuda"), None, "no CUDA device")


def test_device_auto_runs_where_it_can(model_dir, tmp_path):
    r = run("prune", model_dir("llama"), "-o", tmp_path / "out", *PRUNE_EVAL, "--device", "auto", "--eval", "heldout",
            "--eval-seq-len", "64", "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["eval"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_calibration_and_evaluation_on_cuda_equal_cpu(model_dir, tmp_path):
    args = ["--method", "sparsegpt", "--sparsity", "0.5", *CALIB, "--eval", "heldout", "--eval-seq-len", "64"]
    cpu = run("prune", model_dir("llama"), "-o", tmp_path / "cpu", *args, "--json")
    gpu = run("prune", model_dir("llama"), "-o", tmp_path / "gpu", *args, "--device", "cuda", "--json")
    assert cpu.exit_code == 0 and gpu.exit_code == 0, gpu.output
    a, b = load_file(tmp_path / "cpu" / "model.safetensors"), load_file(tmp_path / "gpu" / "model.safetensors")
    for k in a:  # the same masks; SparseGPT's float32 updates may differ in the last bits between devices
        assert torch.equal(a[k] == 0, b[k] == 0), k
    assert json.loads(gpu.stdout)["eval"]["after"] == pytest.approx(json.loads(cpu.stdout)["eval"]["after"], rel=1e-3)


def test_python_api(model_dir, tmp_path):
    recipe = {"calibration": {"samples": 4, "seq_len": 32}, "passes": [{"type": "prune", "sparsity": 0.5}]}
    report = sparsify.compress(model_dir("llama"), recipe, tmp_path / "out", dtype="bfloat16", eval_data="heldout",
                               eval_seq_lens=[64])  # fmt: skip
    assert report["totals"]["target_sparsity"] == pytest.approx(0.5) and report["eval"]["after"] > 1
    assert isinstance(sparsify.load(tmp_path / "out"), T.PreTrainedModel)
    path = tmp_path / "r.yaml"
    path.write_text("passes: [{type: prune, method: magnitude, sparsity: 0.3}]\n")
    sparsify.compress(model_dir("llama"), path, tmp_path / "out", overwrite=True)
    assert "magnitude" in (tmp_path / "out" / "recipe.yaml").read_text()
    with pytest.raises(SparsifyError, match=r"unknown option.*overwrit"):
        sparsify.compress(model_dir("llama"), path, tmp_path / "out2", overwrit=True)


def test_model_card_describes_this_checkpoint(model_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(model_dir("llama"), src)
    (src / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: [en]\ndatasets: [x]\n---\n# The dense model\n")
    out = tmp_path / "out"
    assert run("prune", src, "-o", out, *PRUNE_EVAL, "--eval", "heldout", "--eval-seq-len", "64").exit_code == 0
    card = (out / "README.md").read_text()
    assert "The dense model" not in card and "datasets" not in card
    assert "license: apache-2.0" in card and "- sparsify" in card and "base_model" not in card  # a local folder
    assert "prune wanda 50% unstructured" in card and "| perplexity |" in card and "| target sparsity | 50.0% |" in card
    assert "| zeros | stored dense: the file is as large as the dense one's |" in card


def _with_code(model_dir, dst, files: dict[str, str]):
    shutil.copytree(model_dir("llama"), dst)
    config = json.loads((dst / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}
    (dst / "config.json").write_text(json.dumps(config))
    for name, text in files.items():
        (dst / name).write_text(text)
    return dst


def test_remote_code_travels_with_the_checkpoint_or_the_run_is_refused(model_dir, tmp_path):
    src = _with_code(model_dir, tmp_path / "src", {"configuration_custom.py": "X = 1\n", "helpers.py": "Y = 2\n"})
    out = tmp_path / "out"
    assert run("prune", src, "-o", out, *PRUNE).exit_code == 0
    assert (out / "configuration_custom.py").read_text() == "X = 1\n" and (out / "helpers.py").is_file()
    assert json.loads((out / "config.json").read_text())["auto_map"]
    bad = _with_code(model_dir, tmp_path / "bad", {})
    assert_user_error(run("prune", bad, "-o", tmp_path / "o2", *PRUNE), tmp_path / "o2", "configuration_custom.py")
