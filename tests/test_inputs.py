"""Checkpoints that are not what they claim, values written as stored, and one-line errors (docs/guarantees.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

from sparsify.report import render_html
from tests import zoo
from tests.test_cli import CALIB, FAST, assert_user_error, run

PRUNE = ["--method", "wanda", "--sparsity", "0.5", *FAST]


def _copy(model_dir, family: str, dst: Path) -> Path:
    shutil.copytree(model_dir(family), dst)
    return dst


def _edit(folder: Path, fn) -> None:
    tensors = load_file(folder / "model.safetensors")
    fn(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


# --------------------------------------------------------------------------------- checkpoints


def test_a_tensor_whose_shape_differs_from_the_config_is_refused(model_dir, tmp_path):
    bad = _copy(model_dir, "llama", tmp_path / "bad")
    _edit(bad, lambda t: t.update({"lm_head.weight": torch.zeros(zoo.VOCAB + 8, 64)}))
    out = tmp_path / "out"
    assert_user_error(run("prune", bad, "-o", out, *PRUNE), out, "lm_head.weight", "(328, 64)", "(320, 64)")


@pytest.mark.parametrize("key", ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"])
def test_a_missing_tensor_the_model_needs_is_refused(model_dir, tmp_path, key):
    bad = _copy(model_dir, "llama", tmp_path / "bad")  # llama fixture: lm_head is not tied
    _edit(bad, lambda t: t.pop(key))
    out = tmp_path / "out"
    assert_user_error(run("prune", bad, "-o", out, *PRUNE), out, key)


def test_tied_heads_and_optional_poolers_are_not_needed(model_dir, tmp_path):
    """Gemma ties lm_head to the embeddings; a BERT checkpoint without its pooler is fine (noted)."""
    assert run("prune", model_dir("gemma"), "-o", tmp_path / "gemma", *PRUNE).exit_code == 0
    bert = _copy(model_dir, "bert", tmp_path / "bert")
    _edit(bert, lambda t: [t.pop(k) for k in [k for k in t if k.startswith("pooler.")]])
    r = run("prune", bert, "-o", tmp_path / "out", *PRUNE, "--json")
    assert r.exit_code == 0, r.output
    assert any("pooler.dense.weight" in n and "optional" in n for n in json.loads(r.stdout)["notes"])
    assert not any(k.startswith("pooler.") for k in load_file(tmp_path / "out" / "model.safetensors"))


def test_only_the_files_transformers_reads_are_read(model_dir, tmp_path):
    src = _copy(model_dir, "llama", tmp_path / "src")
    decoy = {k: torch.zeros_like(v) for k, v in load_file(src / "model.safetensors").items()}
    save_file(decoy, src / "model_old.safetensors")
    save_file({"base_model.model.x": torch.ones(2)}, src / "adapter_model.safetensors")
    (src / "adapter_config.json").write_text('{"base_model_name_or_path": "elsewhere"}')
    out = tmp_path / "out"
    r = run("prune", src, "-o", out, *PRUNE, "--json")
    assert r.exit_code == 0, r.output
    assert any("model_old.safetensors" in n and "adapter_model.safetensors" in n for n in json.loads(r.stdout)["notes"])
    written = load_file(out / "model.safetensors")
    original = load_file(model_dir("llama") / "model.safetensors")
    assert torch.equal(written["model.embed_tokens.weight"], original["model.embed_tokens.weight"])
    assert not (out / "adapter_config.json").exists() and not (out / "model_old.safetensors").exists()

    (src / "model.safetensors").unlink()  # only the leftovers: nothing transformers would load
    assert_user_error(run("prune", src, "-o", tmp_path / "o2", *PRUNE), None, "model_old.safetensors")


@pytest.mark.parametrize("shard", ["../other/model.safetensors", "/etc/hostname", "sub/../../x.safetensors"])
def test_index_shard_names_are_confined_to_the_model_folder(model_dir, tmp_path, shard):
    src = _copy(model_dir, "llama", tmp_path / "src")
    keys = list(load_file(src / "model.safetensors"))
    index = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in keys}}
    index["weight_map"][keys[0]] = shard
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_user_error(run("prune", src, "-o", tmp_path / "out", *PRUNE), None, "outside the model folder")


def test_index_that_puts_a_key_in_a_shard_lacking_it_is_refused(model_dir, tmp_path):
    src = _copy(model_dir, "llama", tmp_path / "src")
    keys = list(load_file(src / "model.safetensors"))
    save_file({"other": torch.zeros(1)}, src / "extra.safetensors")
    index = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in keys}}
    index["weight_map"]["model.norm.weight"] = "extra.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_user_error(run("prune", src, "-o", tmp_path / "out", *PRUNE), None, "model.norm.weight", "extra.safetensors")


def test_seq_len_beyond_the_context_is_refused_when_asked_and_fitted_by_default(model_dir, tmp_path):
    out = tmp_path / "out"
    r = run("prune", model_dir("gpt2"), "-o", out, "--sparsity", "0.5", "--seq-len", "300", "--samples", "2")
    assert_user_error(r, out, "seq_len 300", "max_position_embeddings 256")
    r = run("prune", model_dir("gpt2"), "-o", out, "--sparsity", "0.5", "--samples", "2", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["calibration"]["seq_len"] == 256 and report["recipe"]["calibration"]["seq_len"] == 256
    assert any("shortened" in n for n in report["notes"])
    assert_user_error(run("eval", model_dir("gpt2"), "--seq-len", "512"), None, "max_position_embeddings 256")
    r = run(
        "prune",
        model_dir("gpt2"),
        "-o",
        tmp_path / "o2",
        "--method",
        "wanda",
        "--sparsity",
        "0.5",
        *CALIB,
        "--eval",
        "heldout",
        "--eval-seq-len",
        "512",
    )
    assert_user_error(r, tmp_path / "o2", "seq_len 512")


# --------------------------------------------------------------------------------------- values


def test_bf16_compute_writes_untouched_values_in_their_stored_precision(model_dir, tmp_path):
    out = tmp_path / "out"
    assert run("prune", model_dir("llama"), "-o", out, *PRUNE, "--dtype", "bfloat16").exit_code == 0
    before, after = load_file(model_dir("llama") / "model.safetensors"), load_file(out / "model.safetensors")
    assert {t.dtype for t in after.values()} == {torch.float32}
    assert torch.equal(after["model.layers.0.input_layernorm.weight"], before["model.layers.0.input_layernorm.weight"])
    q, q0 = after["model.layers.1.self_attn.q_proj.weight"], before["model.layers.1.self_attn.q_proj.weight"]
    kept = q != 0
    assert kept.float().mean() == pytest.approx(0.5, abs=1 / 64)
    assert torch.equal(q[kept], q0[kept])  # kept weights are the stored float32 values, not bf16 roundings
    assert not torch.equal(q0[kept].to(torch.bfloat16).float(), q0[kept])  # (which would differ)


def test_two_prune_passes_on_the_same_linears_are_counted_once(model_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "calibration: {samples: 4, seq_len: 32}\npasses:\n"
        "  - {type: prune, method: magnitude, sparsity: 0.3}\n  - {type: prune, method: wanda, sparsity: 0.6}\n"
    )
    r = run("compress", model_dir("llama"), "-r", recipe, "-o", tmp_path / "out", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert len(report["layers"]) == 28  # a record per pass and Linear...
    assert report["totals"]["target_parameters"] == sum(
        rec["shape"][0] * rec["shape"][1] for rec in report["layers"][:14]
    )  # ...but each Linear counted once
    assert report["totals"]["target_sparsity"] == pytest.approx(0.6, abs=0.01)
    md = run("report", tmp_path / "out")
    assert "| target Linears | 14 pruned |" in md.stdout


@pytest.mark.parametrize("method", ["wanda", "magnitude", "sparsegpt"])
def test_a_sparsity_that_rounds_a_row_to_zero_is_refused(model_dir, tmp_path, method):
    out = tmp_path / "out"
    r = run("prune", model_dir("llama"), "-o", out, "--method", method, "--sparsity", "0.9999", *FAST)
    assert_user_error(r, out, "0.9999", "row", "keeps one weight per row")


def test_same_model_recipe_and_seed_give_identical_bytes(model_dir, tmp_path):
    args = ["--method", "sparsegpt", "--sparsity", "0.5", "--samples", "6", "--seq-len", "32", "--seed", "3"]
    for name in ("a", "b"):
        assert run("prune", model_dir("qwen2"), "-o", tmp_path / name, *args).exit_code == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        if name not in ("sparsify_report.json", "README.md"):  # they hold the date and time of the run
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


# ------------------------------------------------------------------------------------ one line


def test_a_config_value_of_the_wrong_type_is_one_line(model_dir, tmp_path):
    bad = _copy(model_dir, "llama", tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["rope_parameters"] = "fast please"
    (bad / "config.json").write_text(json.dumps(cfg))
    assert_user_error(run("prune", bad, "-o", tmp_path / "out", *PRUNE), None, "config.json")


def test_a_model_that_needs_remote_code_is_one_line(model_dir, tmp_path):
    bad = _copy(model_dir, "llama", tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(model_type="my_custom_llama", auto_map={"AutoConfig": "configuration_my.MyConfig"})
    (bad / "config.json").write_text(json.dumps(cfg))
    assert_user_error(run("prune", bad, "-o", tmp_path / "out", *PRUNE), None, "--trust-remote-code")
    assert_user_error(run("inspect", bad), None, "--trust-remote-code")


def test_a_garbage_jsonl_calibration_file_is_one_line(model_dir, tmp_path):
    garbage = tmp_path / "calib.jsonl"
    garbage.write_bytes(b'{"text": "fine"}\n{not json at all\n\x00\xff\n')
    r = run("prune", model_dir("llama"), "-o", tmp_path / "out", *PRUNE, "--calib", garbage)
    assert_user_error(r, tmp_path / "out", "calib.jsonl")
    assert len([line for line in r.stderr.splitlines() if line.strip()]) == 1, r.stderr


def test_a_yaml_alias_bomb_gives_a_short_line(model_dir, tmp_path):
    recipe = tmp_path / "bomb.yaml"
    lines = ["a: &a ['lol', 'lol', 'lol', 'lol', 'lol', 'lol', 'lol', 'lol', 'lol']"]
    for i, name in enumerate("bcd"):  # 9^4 values: under the expansion limit, so pydantic sees (and cuts) them
        prev = "abcd"[i]
        lines.append(
            f"{name}: &{name} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]"
        )
    lines.append("passes: [{type: prune, method: wanda, sparsity: *d}]")
    recipe.write_text("\n".join(lines) + "\n")
    r = run("compress", model_dir("llama"), "-r", recipe, "-o", tmp_path / "out")
    assert_user_error(r, tmp_path / "out", "sparsity")
    assert len(r.stderr) < 1000


def test_the_html_report_escapes_every_value(model_dir, tmp_path):
    assert run("prune", model_dir("llama"), "-o", tmp_path / "out", *PRUNE).exit_code == 0
    report = json.loads((tmp_path / "out" / "sparsify_report.json").read_text())
    evil = "<script>alert(1)</script>"
    report["model"] = evil
    report["notes"].append(evil)
    for rec in report["layers"]:
        rec.update(name=evil, method=evil, pattern=evil, status=evil)
    page = render_html(report)
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_loaded_output_still_works_with_plain_transformers(model_dir, tmp_path):
    out = tmp_path / "out"
    assert run("prune", model_dir("llama"), "-o", out, *PRUNE).exit_code == 0
    T.AutoModelForCausalLM.from_pretrained(out)


def test_eval_checks_the_checkpoint_as_compress_does(model_dir, tmp_path):
    bad = _copy(model_dir, "llama", tmp_path / "bad")
    _edit(bad, lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    assert_user_error(run("eval", bad, "--seq-len", "32"), None, "up_proj")
    many = _copy(model_dir, "llama", tmp_path / "many")
    cfg = json.loads((many / "config.json").read_text())
    cfg["num_hidden_layers"] = 100_000
    (many / "config.json").write_text(json.dumps(cfg))
    for args in (["eval", many, "--seq-len", "32"], ["prune", many, "-o", tmp_path / "out", *PRUNE]):
        assert_user_error(run(*args), None, "100000 layers", "holds 2")


def test_a_ten_level_yaml_alias_bomb_is_refused_before_it_expands(model_dir, tmp_path):
    lines = ["a: &a ['lol', 'lol', 'lol', 'lol', 'lol', 'lol', 'lol', 'lol', 'lol']"]
    for prev, name in zip("abcdefghi", "bcdefghij", strict=True):
        lines.append(
            f"{name}: &{name} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]"
        )
    lines.append("passes: [{type: prune, method: wanda, sparsity: *j}]")
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text("\n".join(lines) + "\n")
    assert_user_error(run("compress", model_dir("llama"), "-r", recipe, "-o", tmp_path / "out"), None, "alias")


# ------------------------------------------------------------------------------- issue 31: a robustness probe


def test_calibration_that_cannot_fit_in_memory_is_refused_before_any_work(model_dir, tmp_path, monkeypatch):
    """Checked against this machine's memory before any window is sampled (1e9 windows were an OOM kill)."""
    from sparsify.pipeline import prepare as pipeline  # the module that calls it

    out = tmp_path / "out"
    args = ["prune", model_dir("llama"), "-o", out, "--method", "wanda", "--sparsity", "0.5", "--no-eval"]
    r = run(*args, "--samples", "1000000000", "--seq-len", "32")
    assert_user_error(r, out, "--samples 1000000000", "GiB available", "samples fit")
    monkeypatch.setattr(pipeline, "available_memory", lambda device: 1 << 30)
    # a window: 32 tokens × 64 hidden × 4 bytes, a layer's inputs and outputs; 32 int64 tokens and its start
    fit = (1 << 30) // (32 * 64 * 4 * 2 + 32 * 8 + 64)
    assert_user_error(run(*args, "--samples", str(fit + 1), "--seq-len", "32"), out, f"at most {fit:,} samples fit")


@pytest.mark.parametrize("flag", ["--samples", "--seq-len", "--batch-size", "--seed", "--moe-seed"])
def test_integers_past_int64_are_one_line(model_dir, tmp_path, flag):
    out = tmp_path / "out"
    command, *rest = (
        ["moe-convert", "--experts", "4", "--top-k", "2"] if flag == "--moe-seed" else ["prune", *PRUNE[:4]]
    )
    given = {"--samples": "4", "--seq-len": "32", flag: str(2**70)}
    r = run(command, model_dir("llama"), "-o", out, *rest, "--no-eval", *(x for kv in given.items() for x in kv))
    assert_user_error(r, out, flag)
    assert "Exception raised from" not in r.stderr and "Overflow" not in r.stderr


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory) -> Path:
    """A Llama with 256 embedding rows and the 320-token tokenizer of the zoo (a tokenizer larger than the model)."""
    config = zoo.CONFIGS["llama"]()
    config.vocab_size = 256
    folder = tmp_path_factory.mktemp("small-vocab") / "llama"
    torch.manual_seed(0)
    T.LlamaForCausalLM(config).save_pretrained(folder)
    zoo.tokenizer().save_pretrained(folder)
    return folder


def test_token_ids_past_the_embedding_are_refused_before_work(small_vocab, tmp_path):
    out = tmp_path / "out"
    for args in (
        ["prune", small_vocab, "-o", out, *PRUNE],
        ["quantize", small_vocab, "-o", out, "--scheme", "w8a16", *FAST],
        ["prune", small_vocab, "-o", out, "--method", "magnitude", "--sparsity", "0.5", "--calib", "none"],  # eval
        ["eval", small_vocab, "--seq-len", "32"],
    ):
        assert_user_error(run(*args), out, "beyond the model's vocab_size 256", "the tokenizer does not match")


def test_an_integer_tensor_where_the_model_holds_floats_is_refused_naming_it(model_dir, tmp_path):
    key = "model.layers.1.self_attn.q_proj.weight"
    bad = _copy(model_dir, "llama", tmp_path / "bad")
    _edit(bad, lambda t: t.update({key: t[key].to(torch.int8)}))
    out = tmp_path / "out"
    assert_user_error(run("prune", bad, "-o", out, *PRUNE), out, key, "int8")
    assert_user_error(run("eval", bad, "--seq-len", "32"), None, key, "int8")
