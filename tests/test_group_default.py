"""w4a16's default group size, chosen per model before any work: 128 where it divides every quantized Linear's
inputs, else 32 (GGUF's block: the output exports to GGUF as stored), recorded as a number and noted; an explicit
size that does not divide is one line naming the flag and the sizes that do; ``--help`` shows the rule."""

from __future__ import annotations

import json

import pytest
import transformers as T
import yaml

from sparsify.errors import SparsifyError
from sparsify.recipe import parse_recipe
from tests import zoo
from tests.test_cli import FAST, assert_user_error, run
from tests.zoo import compress

RTN = {"type": "quantize", "scheme": "w4a16", "method": "rtn"}
FREE = {"data": "none"}  # RTN needs no calibration text


def _recipe(**extra):
    return parse_recipe({"calibration": FREE, "passes": [{**RTN, **extra}]})


def _groups(report) -> set:
    return {r["group_size"] for r in report["layers"] if r.get("kind") == "quantize"}


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A tiny Llama whose every Linear's inputs 128 divides (hidden 128, intermediate 256)."""
    return zoo.save_llama(tmp_path_factory.mktemp("llama-wide"), hidden_size=128, intermediate_size=256)


def test_the_default_is_32_where_128_does_not_divide_and_says_so(model_dir, tmp_path):
    """The tiny Llama's hidden size 64, as SmolLM2's 576, is no multiple of 128: groups of 32, noted, recorded."""
    report = compress(model_dir("llama"), _recipe(), tmp_path / "out")
    assert report["totals"]["quantized_linears"] == 14 and _groups(report) == {32}
    assert report["passes"][0]["settings"]["group_size"] == 32  # the number, not "the default"
    assert report["passes"][0]["description"].startswith("quantize w4a16 g32 rtn")
    note = [n for n in report["notes"] if "group size 32" in n]
    assert len(note) == 1, report["notes"]
    assert "128 does not divide model.layers.0.self_attn.q_proj's 64 inputs" in note[0]
    assert "exports to GGUF Q4_0 as stored" in note[0]
    scales = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert scales["config_groups"]["group_0"]["weights"]["group_size"] == 32


def test_the_default_is_128_where_it_divides_every_linear(wide, tmp_path):
    report = compress(wide, _recipe(), tmp_path / "out")
    assert _groups(report) == {128} and report["passes"][0]["settings"]["group_size"] == 128
    assert not [n for n in report["notes"] if "group size" in n], report["notes"]


def test_asymmetric_default_names_q4_1_and_w8a16_stays_per_channel(model_dir, tmp_path):
    report = compress(model_dir("llama"), _recipe(symmetric=False), tmp_path / "asym")
    assert _groups(report) == {32} and any("GGUF Q4_1 as stored" in n for n in report["notes"])
    step = {"type": "quantize", "scheme": "w8a16", "method": "rtn"}
    report = compress(model_dir("llama"), parse_recipe({"calibration": FREE, "passes": [step]}), tmp_path / "w8")
    assert _groups(report) == {"channel"} and "group_size" not in report["passes"][0]["settings"]
    assert not [n for n in report["notes"] if "group size" in n]


def test_a_rerun_from_the_written_recipe_quantizes_alike(model_dir, tmp_path):
    src = model_dir("llama")
    compress(src, _recipe(), tmp_path / "a")
    again = parse_recipe(yaml.safe_load((tmp_path / "a" / "recipe.yaml").read_text()))
    report = compress(src, again, tmp_path / "b")
    assert _groups(report) == {32}
    a, b = (json.loads((tmp_path / d / "config.json").read_text())["quantization_config"] for d in "ab")
    assert a == b
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


@pytest.mark.parametrize(
    ("group", "fragments"),
    [
        (128, ["--group-size 128", "model.layers.0.self_attn.q_proj's 64 inputs", "32 (exports to GGUF Q4_0 as stored)"
               " or 64 divide every quantized Linear's inputs", "-1: per channel"]),
        (48, ["--group-size 48", "does not divide", "32 (exports to GGUF Q4_0 as stored) or 64"]),
    ],
)  # fmt: skip
def test_an_explicit_size_that_does_not_divide_is_refused_before_work(model_dir, tmp_path, group, fragments):
    out = tmp_path / "out"
    with pytest.raises(SparsifyError) as e:
        compress(model_dir("llama"), _recipe(group_size=group), out)
    assert "\n" not in str(e.value) and all(f in str(e.value) for f in fragments), str(e.value)
    assert not out.exists() and not list(tmp_path.iterdir())
    r = run("quantize", model_dir("llama"), "-o", out, "--scheme", "w4a16", "--group-size", str(group), *FAST)
    assert_user_error(r, out, *fragments)


def test_a_model_no_default_divides_is_refused_with_the_sizes_that_do(tmp_path):
    config = T.LlamaConfig(**{**zoo._COMMON, "hidden_size": 48, "intermediate_size": 96}, **zoo._IDS)
    T.LlamaForCausalLM(config).save_pretrained(tmp_path / "m")
    zoo.tokenizer().save_pretrained(tmp_path / "m")
    with pytest.raises(SparsifyError, match=r"default group size \(128, else 32\) does not divide .*16 divides"):
        compress(tmp_path / "m", _recipe(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_help_shows_the_default_group_size_and_its_rule():
    r = run("quantize", "--help")
    text = " ".join(r.stdout.split())
    assert r.exit_code == 0
    assert "--group-size N weights per scale along the input; -1: per channel [default: w4a16: 128 where it" in text
    assert "else 32, GGUF's block (exports to GGUF as stored); w8a16: per channel]" in text
