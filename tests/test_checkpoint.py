"""Checkpoint I/O: sharding, dtypes, .bin input, prefixed keys, atomic writes, one layer in memory at a time."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

from sparsify.checkpoint import TensorInfo, check_output, open_model, partial_output, plan_shards, write_shard
from sparsify.pipeline import Options, stages
from sparsify.recipe import parse_recipe
from tests import zoo
from tests.zoo import compress

RECIPE = parse_recipe(
    {"calibration": {"samples": 4, "seq_len": 32}, "passes": [{"type": "prune", "method": "wanda", "sparsity": 0.5}]}
)


def _logits(path, ids):
    model = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_writer_round_trip_and_sharding(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7, dtype=torch.float64).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "empty": torch.zeros(0, 4),
    }
    infos = [(k, TensorInfo(v.dtype, tuple(v.shape))) for k, v in tensors.items()]
    shards = plan_shards(infos, max_shard_bytes=64)
    assert len(shards) > 1 and sorted(k for ks in shards.values() for k in ks) == sorted(tensors)
    for name, keys in shards.items():
        entries = [(k, i) for k, i in infos if k in keys]
        write_shard(tmp_path / name, entries, ((k, tensors[k]) for k in reversed(keys)))  # any order
    loaded = {}
    for name in shards:
        loaded.update(load_file(tmp_path / name))
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v)
    assert not list(tmp_path.glob("*.part"))


def test_writer_refuses_unwritten_and_misshapen(tmp_path):
    plan = [("a", TensorInfo(torch.float32, (2, 2))), ("b", TensorInfo(torch.float32, (2,)))]
    with pytest.raises(RuntimeError, match="differs from planned"):
        write_shard(tmp_path / "x.safetensors", plan, iter([("a", torch.zeros(3))]))
    with pytest.raises(RuntimeError, match="never written"):
        write_shard(tmp_path / "x.safetensors", plan, iter([("a", torch.zeros(2, 2))]))
    assert not (tmp_path / "x.safetensors").exists()


def test_sharded_output_loads_and_equals_single_file(model_dir, tmp_path):
    src = model_dir("llama")
    compress(src, RECIPE, tmp_path / "one")
    compress(src, RECIPE, tmp_path / "many", Options(max_shard_bytes=50_000, evaluate=False))
    shards = sorted(p.name for p in (tmp_path / "many").glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "many" / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, zoo.VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(tmp_path / "many", ids), _logits(tmp_path / "one", ids), rtol=0, atol=0)
    # and a sharded input is read back just as well
    compress(tmp_path / "many", RECIPE, tmp_path / "again")


def test_bf16_input_keeps_bf16(model_dir, tmp_path):
    src = model_dir("qwen2", torch.bfloat16)
    report = compress(src, RECIPE, tmp_path / "out")
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert {t.dtype for t in out.values()} == {torch.bfloat16}
    q = out["model.layers.0.self_attn.q_proj.weight"]
    assert (q == 0).float().mean().item() == pytest.approx(0.5, abs=1 / 64)
    assert report["totals"]["bytes"] < 2 * sum(t.numel() for t in out.values()) + 10_000


def test_bin_input_is_loaded_safely_and_written_as_safetensors(tmp_path):
    src = tmp_path / "bin"
    model = zoo.build("gpt2")
    model.config.save_pretrained(src)
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    zoo.tokenizer().save_pretrained(src)
    assert list(src.glob("*.bin")) and not list(src.glob("*.safetensors"))
    compress(src, RECIPE, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file() and not list((tmp_path / "out").glob("*.bin"))
    T.AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_prefixed_encoder_checkpoint_keeps_its_keys_and_heads(tmp_path):
    """A BertForMaskedLM checkpoint ("bert." keys plus a "cls." head) pruned through AutoModel."""
    src = tmp_path / "mlm"
    torch.manual_seed(0)
    T.BertForMaskedLM(zoo.CONFIGS["bert"]()).save_pretrained(src)
    zoo.tokenizer().save_pretrained(src)
    report = compress(src, RECIPE, tmp_path / "out")
    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert before.keys() == after.keys() and any(k.startswith("cls.") for k in after)
    q = after["bert.encoder.layer.0.attention.self.query.weight"]
    assert (q == 0).float().mean().item() == pytest.approx(0.5, abs=1 / 64)
    assert torch.equal(before["cls.predictions.bias"], after["cls.predictions.bias"])
    assert len(report["layers"]) == 12
    T.BertForMaskedLM.from_pretrained(tmp_path / "out")


def test_only_one_layer_is_materialized_at_a_time(model_dir, tmp_path, monkeypatch):
    seen = []
    original = stages.LazyLayers.load

    def spy(self, index):
        others = [j for j, layer in enumerate(self.layers) if j != index]
        seen.append(all(p.is_meta for j in others for p in self.layers[j].parameters()))
        return original(self, index)

    monkeypatch.setattr(stages.LazyLayers, "load", spy)
    compress(model_dir("llama"), RECIPE, tmp_path / "out")
    assert seen and all(seen)


def test_partial_output_leaves_nothing_on_failure(tmp_path):
    out = check_output(tmp_path / "a" / "b" / "out", [], None, overwrite=False)
    with pytest.raises(RuntimeError), partial_output(out) as work:
        (work.dir / "partial").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # the partial folder and the parents created for it are gone


def test_open_model_reads_headers_only(model_dir):
    md = open_model(model_dir("llama"))
    info = md.source.info("model.layers.0.mlp.down_proj.weight")
    assert info.shape == (64, 128) and info.dtype == torch.float32
