"""`sparsify export gguf --type q4_k_m` (and llama-quantize's other named mixes): each matrix in the type
llama-quantize gives it by name and layer, fitted by sparsify; the file reads back in transformers."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import gguf
import pytest
import torch
import transformers as T

from sparsify.checkpoint import open_model
from sparsify.export import GgufConfig, GgufType
from sparsify.export.gguf_plan import plan
from sparsify.export.mixes import MIXES, more_bits
from tests import zoo
from tests.test_cli import assert_user_error, run

Q = gguf.GGMLQuantizationType
LAYERS = 8


def test_more_bits_is_llama_cpps_layer_choice():
    """llama.cpp's use_more_bits on a 32-layer model: the first and last four layers and every third between."""
    assert [i for i in range(32) if more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert [i for i in range(8) if more_bits(i, 8)] == [0, 3, 6, 7]


def test_every_mix_is_a_type_choice():
    assert set(MIXES) <= set(typing.get_args(GgufType))


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """An 8-layer Llama whose rows are whole super-blocks of 256 but the down projection's (320: blocks of 32),
    embeddings tied to the output head."""
    return zoo.save_llama(tmp_path_factory.mktemp("mix"), hidden_size=256, intermediate_size=320,
                          num_hidden_layers=LAYERS, max_position_embeddings=128, tie_word_embeddings=True)  # fmt: skip


def _types(model: Path, mix: str) -> dict[str, Q]:
    """The type of each GGUF tensor the export of ``model`` plans in ``mix`` (nothing rounded or written)."""
    p = plan(open_model(model), model / "unused.gguf", GgufConfig(tensor_type=mix))
    return {t.name: t.qtype for t in p.tensors}


def test_q4_k_m_gives_each_matrix_llama_quantizes_type(llama):
    types = _types(llama, "q4_k_m")
    assert "output.weight" not in types and types["token_embd.weight"] == Q.Q6_K  # tied: the output head's type
    for i in range(LAYERS):
        more = i in (0, 3, 6, 7)
        assert types[f"blk.{i}.attn_v.weight"] == (Q.Q6_K if more else Q.Q4_K), i
        # rows of 320: llama-quantize's fallbacks, Q6_K -> Q8_0 and Q4_K -> Q5_0
        assert types[f"blk.{i}.ffn_down.weight"] == (Q.Q8_0 if more else Q.Q5_0), i
        for kind in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert types[f"blk.{i}.{kind}.weight"] == Q.Q4_K, (i, kind)


def test_q3_k_m_and_q3_k_s_differ_where_llama_quantize_gives_more_bits(llama):
    m, s = _types(llama, "q3_k_m"), _types(llama, "q3_k_s")
    assert [m[f"blk.{i}.attn_v.weight"] for i in range(3)] == [Q.Q5_K, Q.Q5_K, Q.Q4_K]
    assert all(m[f"blk.{i}.attn_output.weight"] == Q.Q4_K for i in range(LAYERS))
    assert all(m[f"blk.{i}.ffn_down.weight"] == Q.Q5_0 for i in range(LAYERS))  # Q4_K from layer 8 // 16 = 0
    assert all(s[f"blk.{i}.{k}.weight"] == Q.Q3_K for i in range(LAYERS) for k in ("attn_v", "attn_output"))


def test_a_mix_is_written_with_its_file_type_and_reads_back(tmp_path):
    """Two layers: more_bits(1, 2), so layer 1's attn_v is Q6_K and layer 0's Q5_K_M's base."""
    model = zoo.save_llama(tmp_path / "m", hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                           max_position_embeddings=128)  # fmt: skip
    out = tmp_path / "m.gguf"
    r = run("export", "gguf", model, "-o", out, "--type", "q5_k_m", "--importance", "none", "--json")
    assert r.exit_code == 0, r.output
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert (types["blk.0.attn_v.weight"], types["blk.1.attn_v.weight"]) == (Q.Q5_K, Q.Q6_K)
    assert (types["token_embd.weight"], types["output.weight"]) == (Q.Q5_K, Q.Q6_K)  # untied: the base type
    file_type = reader.fields["general.file_type"]
    assert int(file_type.parts[file_type.data[0]][0]) == gguf.LlamaFileType.MOSTLY_Q5_K_M
    assert json.loads(r.stdout)["types"] == {"F32": 5, "Q5_K": 13, "Q6_K": 3}

    source = T.AutoModelForCausalLM.from_pretrained(model).eval()
    loaded = T.AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    ids = torch.randint(3, zoo.VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p, q = source(ids).logits.log_softmax(-1), loaded(ids).logits.log_softmax(-1)
    kl = float((p.exp() * (p - q)).sum(-1).mean())
    assert 0 < kl < 0.01, kl


def test_a_mix_on_a_model_with_experts_is_one_line(tmp_path):
    config = T.MixtralConfig(**{**zoo._COMMON, "num_hidden_layers": 1}, **zoo._IDS, num_local_experts=4,
                             num_experts_per_tok=2)  # fmt: skip
    torch.manual_seed(0)
    T.MixtralForCausalLM(config).save_pretrained(tmp_path / "moe")
    zoo.tokenizer().save_pretrained(tmp_path / "moe")
    out = tmp_path / "m.gguf"
    r = run("export", "gguf", tmp_path / "moe", "-o", out, "--type", "q4_k_m")
    assert_user_error(r, out, "--type q4_k_m", "experts")
