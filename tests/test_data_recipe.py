"""Calibration text and the recipe schema."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from sparsify.data import BUILTIN_CALIB, BUILTIN_EVAL, eval_windows, load_text, sample_windows, tokenize
from sparsify.errors import SparsifyError
from sparsify.recipe import load_recipe, parse_recipe
from tests import zoo

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_builtin_calibration_and_evaluation_text_are_disjoint():
    calib, held = load_text(BUILTIN_CALIB), load_text(BUILTIN_EVAL)
    assert calib.documents and held.documents
    assert not set(calib.documents) & set(held.documents)
    assert load_text(None).name == BUILTIN_CALIB


def test_text_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first line\nsecond line\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    (tmp_path / "c.json").write_text(json.dumps([{"text": "x", "id": 1}, {"text": "y", "id": 2}]))
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "1.txt").write_text("doc one")
    (tmp_path / "dir" / "2.txt").write_text("doc two")
    assert load_text(tmp_path / "a.txt").documents == ["first line\nsecond line\n"]
    assert load_text(tmp_path / "b.jsonl").documents == ["one", "two"]
    assert load_text(tmp_path / "c.json").documents == ["x", "y"]
    assert sorted(load_text(tmp_path / "dir").documents) == ["doc one", "doc two"]


def test_text_errors(tmp_path):
    (tmp_path / "no_text.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    (tmp_path / "x.parquet").write_text("")
    (tmp_path / "x.bin").write_text("x")
    (tmp_path / "emptydir").mkdir()
    for name, fragment in [
        ("no_text.jsonl", "no 'text' or 'messages' column .columns: body.; pass --text-column"),
        ("empty.txt", "empty"),
        ("blank.txt", "no text"),
        ("x.parquet", "empty"),
        ("x.bin", "unsupported"),
        ("emptydir", "no .txt"),
        ("missing.txt", "not found"),
    ]:
        with pytest.raises(SparsifyError, match=fragment):
            load_text(tmp_path / name)
    with pytest.raises(SparsifyError, match="no column 'txt'"):
        load_text(tmp_path / "no_text.jsonl", text_column="txt")


def test_text_as_users_hold_it(tmp_path):
    """parquet, a datasets folder (Dataset and DatasetDict), a chosen column, chat messages via the chat template."""
    import datasets

    rows = {"body": ["first document", "second document"], "id": [1, 2]}
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "d.parquet"))
    assert load_text(tmp_path / "d.parquet", text_column="body").documents == rows["body"]
    datasets.Dataset.from_dict({"text": rows["body"]}).save_to_disk(str(tmp_path / "saved"))
    assert load_text(tmp_path / "saved").documents == rows["body"]
    splits = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": ["t"]}), "test": datasets.Dataset.from_dict({"text": ["u"]})}
    )
    splits.save_to_disk(str(tmp_path / "dict"))
    assert load_text(tmp_path / "dict").documents == ["t"]

    chats = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(c) for c in chats) + "\n")
    tok = zoo.tokenizer()
    with pytest.raises(SparsifyError, match="no chat template"):
        load_text(tmp_path / "chat.jsonl", tokenizer=tok)
    tok = copy.deepcopy(tok)
    tok.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
    assert load_text(tmp_path / "chat.jsonl", tokenizer=tok).documents == ["<s>user: hi</s>\n<s>assistant: hello</s>\n"]
    ids = tokenize(load_text(tmp_path / "chat.jsonl", tokenizer=tok), tok)
    assert (ids == tok.bos_token_id).sum() == 2  # the template's special tokens are tokens, not text


def test_sampling_is_seeded_and_in_range():
    stream = torch.arange(1000)
    a, b, c = sample_windows(stream, 16, 50, 0), sample_windows(stream, 16, 50, 0), sample_windows(stream, 16, 50, 1)
    assert a.shape == (16, 50) and torch.equal(a, b) and not torch.equal(a, c)
    assert ((a[:, 1:] - a[:, :-1]) == 1).all()  # contiguous windows of the stream
    with pytest.raises(SparsifyError, match="fewer than seq_len"):
        sample_windows(torch.arange(10), 4, 50, 0)
    w = eval_windows(stream, 300)
    assert w.shape == (3, 300) and torch.equal(w.reshape(-1), stream[:900])
    assert eval_windows(stream, 100, max_windows=2).shape == (2, 100)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_recipes_are_valid(path):
    recipe = load_recipe(path)
    assert recipe.passes
    assert parse_recipe(__import__("yaml").safe_load(recipe.to_yaml())) == recipe  # effective recipe round-trips


@pytest.mark.parametrize(
    ("step", "fragment"),
    [
        ({"method": "wanda"}, "needs a sparsity"),
        ({"method": "wanda", "pattern": "2:4", "sparsity": 0.3}, "contradicts"),
        ({"method": "wanda", "pattern": "2:4", "profile": "owl"}, "unstructured sparsity only"),
        ({"method": "wanda", "sparsity": 0.5, "owl_lambda": 0.7}, "owl_lambda"),
        ({"method": "sparsegpt", "sparsity": 0.5, "dampening": 0}, "dampening"),
        ({"method": "wanda", "sparsity": 0.5, "dense_targets": True}, "applies to method sparsegpt"),
        ({"method": "sparsegpt", "sparsity": 0.5, "dense_targets": True, "sequential": True}, "cannot be combined"),
        ({"method": "wanda", "sparsity": 0.5, "targets": ["re:("]}, None),
    ],
)
def test_recipe_errors_name_the_key(step, fragment):
    data = {"passes": [{"type": "prune", **step}]}
    if fragment is None:  # a bad regex is caught when targets are resolved, not by the schema
        parse_recipe(data)
        return
    with pytest.raises(SparsifyError, match=fragment):
        parse_recipe(data)


def test_recipe_structure_errors():
    with pytest.raises(SparsifyError, match="passes"):
        parse_recipe({"passes": []})
    with pytest.raises(SparsifyError, match="type"):
        parse_recipe({"passes": [{"type": "nope"}]})
    with pytest.raises(SparsifyError, match="mapping"):
        parse_recipe(["not", "a", "mapping"])
    with pytest.raises(SparsifyError, match=r"calibration\.samples"):
        parse_recipe({"calibration": {"samples": 0}, "passes": [{"type": "prune", "sparsity": 0.5}]})


def test_nm_implies_sparsity():
    recipe = parse_recipe({"passes": [{"type": "prune", "method": "sparsegpt", "pattern": "2:8"}]})
    assert recipe.passes[0].target_sparsity == pytest.approx(0.75) and recipe.passes[0].nm == (2, 8)
