"""`sparsify export gguf --type q4_k_m` (and llama-quantize's other named mixes): each matrix in the type
llama-quantize gives it by name and layer, fitted by sparsify; the file reads back in transformers. And
`--type q4_0|q5_0` with an importance: the first eighth of the ffn_down matrices in Q4_1|Q5_1, as
llama-quantize --imatrix gives them; `--type iq4_nl|iq4_xs`: attn_v in Q5_K where n_gqa >= 4 and, without an
importance, the first eighth of the ffn_down matrices in Q5_K, as llama-quantize gives them."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import gguf
import pytest
import torch
import transformers as T
from gguf.quants import dequantize as gguf_dequantize

from sparsify.checkpoint import open_model
from sparsify.export import GgufConfig, GgufType
from sparsify.export.gguf_plan import plan
from sparsify.export.mixes import MIXES, TYPE_RULES, Facts, more_bits, tensor_type, type_of
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


def _types(model: Path, mix: str, importance: str = "calibration") -> dict[str, Q]:
    """The type of each GGUF tensor the export of ``model`` plans in ``mix`` (nothing rounded or written)."""
    p = plan(open_model(model), model / "unused.gguf", GgufConfig(tensor_type=mix, importance=importance))
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


def test_with_an_imatrix_q4_0_and_q5_0_give_the_first_eighth_of_ffn_down_q4_1_and_q5_1():
    """llama-quant.cpp: (Q4_0 or Q5_0) && has_imatrix && i_layer < n_layer/8 -> Q4_1 (Q5_1), ffn_down only."""
    assert set(TYPE_RULES) <= set(typing.get_args(GgufType))
    for want, more in (("q4_0", "q4_1"), ("q5_0", "q5_1")):
        firsts = [type_of(want, f"blk.{i}.ffn_down.weight", 32, imatrix=True) for i in range(5)]
        assert firsts == [more] * 4 + [want]
        assert all(type_of(want, f"blk.{i}.ffn_down.weight", 32, gqa=8) == want for i in range(32))  # no imatrix
        assert type_of(want, "blk.0.ffn_down.weight", 7, imatrix=True) == want  # 7 // 8 = 0 layers
        for name in ("blk.0.ffn_up.weight", "blk.0.attn_v.weight", "blk.0.ffn_down_exps.weight", "output.weight"):
            assert type_of(want, name, 32, gqa=8, imatrix=True) == want, name
    for want in ("q4_1", "q5_1", "q8_0", "q4_k", "auto"):
        for imatrix in (False, True):
            assert type_of(want, "blk.0.ffn_down.weight", 32, gqa=8, imatrix=imatrix) == want
            assert type_of(want, "blk.0.attn_v.weight", 32, gqa=8, imatrix=imatrix) == want


def test_iq4_gives_attn_v_q5_k_where_n_gqa_is_4_and_the_first_ffn_downs_q5_k_without_an_imatrix():
    """llama-quant.cpp (11434): attn_v: ``(IQ4_NL || IQ4_XS) && n_gqa() >= 4 -> Q5_K``, imatrix or not (a fused
    attn_qkv is attn_v-like there: category_is_attn_v); ffn_down: ``i_layer < n_layer/8 && (IQ4_NL || IQ4_XS) &&
    !has_imatrix -> Q5_K``; nothing else for a dense decoder."""
    for want in ("iq4_nl", "iq4_xs"):
        for imatrix in (False, True):
            gqas = [type_of(want, "blk.9.attn_v.weight", 32, gqa, imatrix) for gqa in (0, 1, 2, 3, 4, 5, 8)]
            assert gqas == [want] * 4 + ["q5_k"] * 3  # Llama-3-8B: 32 / 8 = 4; SmolLM2: 9 / 3 = 3
            assert type_of(want, "blk.9.attn_qkv.weight", 32, 4, imatrix) == "q5_k"  # Phi-3-medium: 40 / 10
            assert type_of(want, "blk.9.attn_qkv.weight", 32, 1, imatrix) == want  # Phi-3-mini: 32 / 32
        assert [type_of(want, f"blk.{i}.ffn_down.weight", 32, gqa=1) for i in range(5)] == ["q5_k"] * 4 + [want]
        assert [type_of(want, f"blk.{i}.ffn_down.weight", 16) for i in range(3)] == ["q5_k"] * 2 + [want]
        assert type_of(want, "blk.0.ffn_down.weight", 7) == want  # 7 // 8 = 0 layers
        assert all(type_of(want, f"blk.{i}.ffn_down.weight", 32, imatrix=True) == want for i in range(32))
        others = ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up", "ffn_down_exps")
        for name in [f"blk.0.{k}.weight" for k in others] + ["output.weight", "token_embd.weight"]:
            assert type_of(want, name, 32, gqa=8) == want, name  # the output head: gguf_plan._choose's


def test_rules_read_facts_and_attn_qkv_takes_attn_vs_rule_in_a_mix():
    """The mixes read the same :class:`Facts`; llama.cpp gives a fused attn_qkv attn_v's type in every mix."""
    assert MIXES["q3_k_m"].rules["attn_v"](Facts(1, 32)) == "q5_k"
    assert MIXES["q4_k_m"].rules["ffn_down"](Facts(4, 32, gqa=4, imatrix=True)) is None  # not more_bits(4, 32)
    for layer, want in ((0, "q6_k"), (4, "q4_k"), (6, "q6_k")):
        assert tensor_type("q4_k_m", f"blk.{layer}.attn_qkv.weight", 32, tied=False) == want
        assert tensor_type("q4_k_m", f"blk.{layer}.attn_v.weight", 32, tied=False) == want


@pytest.mark.parametrize("base, more", [("q4_0", Q.Q4_1), ("q5_0", Q.Q5_1)], ids=["q4_0", "q5_0"])
def test_q4_0_and_q5_0_plan_ffn_down_in_more_bits_with_an_importance_only(llama, base, more, tmp_path):
    """8 layers: blk.0's ffn_down alone (8 // 8 = 1), measured or read from a llama-imatrix file; with --importance
    none, as llama-quantize without an imatrix, every decoder matrix in the file's type."""
    weighted, plain = _types(llama, base), _types(llama, base, importance="none")
    (tmp_path / "imatrix.gguf").touch()  # the plan only names it: the file is read once the types are chosen
    assert _types(llama, base, importance=str(tmp_path / "imatrix.gguf")) == weighted
    assert weighted["token_embd.weight"] == plain["token_embd.weight"]  # tied: the output head, not the rule's
    matrices = [f"blk.{i}.{k}.weight" for i in range(LAYERS) for k in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                                      "ffn_gate", "ffn_up", "ffn_down")]  # fmt: skip
    assert [n for n in matrices if weighted[n] != Q[base.upper()]] == ["blk.0.ffn_down.weight"]
    assert weighted["blk.0.ffn_down.weight"] == more
    assert all(plain[n] == Q[base.upper()] for n in matrices)


def test_q4_0_with_the_measured_importance_writes_q4_1_ffn_down_and_reads_back(llama, calib_file, tmp_path):
    out = tmp_path / "q4_0.gguf"
    args = ["--calib", calib_file, "--samples", "4", "--seq-len", "32", "--json"]
    r = run("export", "gguf", llama, "-o", out, "--type", "q4_0", *args)
    assert r.exit_code == 0, r.output
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == Q.Q4_1 and types["blk.1.ffn_down.weight"] == Q.Q4_0
    # the tied embedding is the output head: Q6_K, its rows whole super-blocks of 256, as llama-quantize gives it
    assert json.loads(r.stdout)["types"] == {"F32": 17, "Q4_0": 55, "Q4_1": 1, "Q6_K": 1}
    file_type = reader.fields["general.file_type"]
    assert int(file_type.parts[file_type.data[0]][0]) == gguf.LlamaFileType.MOSTLY_Q4_0

    source = T.AutoModelForCausalLM.from_pretrained(llama).eval()
    loaded = T.AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    ids = torch.randint(3, zoo.VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p, q = source(ids).logits.log_softmax(-1), loaded(ids).logits.log_softmax(-1)
    assert 0 < float((p.exp() * (p - q)).sum(-1).mean()) < 0.05


def test_a_legacy_files_output_head_takes_llama_quantizes_type():
    """Q4_0..Q5_1: the output head (and a tied embedding) Q6_K on rows of whole super-blocks, else Q8_0; an untied
    embedding and every matrix of a Q8_0 file in the file's type (llama-quant.cpp, the output-tensor branch)."""
    from sparsify.export.gguf_plan import _legacy_head

    for want in ("q4_0", "q4_1", "q5_0", "q5_1"):
        assert _legacy_head("output", want, 4096, tied=False) == "q6_k"
        assert _legacy_head("output", want, 576, tied=False) == "q8_0"
        assert _legacy_head("token_embd", want, 4096, tied=True) == "q6_k"
        assert _legacy_head("token_embd", want, 4096, tied=False) == want
        assert _legacy_head("attn_q", want, 4096, tied=True) == want
    assert _legacy_head("output", "q8_0", 4096, tied=True) == "q8_0"


@pytest.fixture(scope="module")
def gqa4(tmp_path_factory) -> Path:
    """An 8-layer Llama with n_gqa = 8 / 2 = 4 (Llama-3-8B's 32 / 8), every row whole super-blocks of 256."""
    return zoo.save_llama(tmp_path_factory.mktemp("gqa4"), hidden_size=256, intermediate_size=512,
                          num_hidden_layers=LAYERS, num_attention_heads=8, num_key_value_heads=2,
                          max_position_embeddings=128)  # fmt: skip


_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _raised(types: dict[str, Q], base: Q) -> dict[str, Q]:
    """The decoder matrices not in ``base`` (output head and embeddings aside)."""
    names = [f"blk.{i}.{k}.weight" for i in range(LAYERS) for k in _MATRICES]
    return {n: types[n] for n in names if types[n] != base}


@pytest.mark.parametrize("want", ["iq4_nl", "iq4_xs"])
def test_iq4_plans_attn_v_q5_k_with_n_gqa_4_and_the_first_ffn_down_q5_k_without_an_importance(gqa4, llama, want):
    base, v = Q[want.upper()], {f"blk.{i}.attn_v.weight": Q.Q5_K for i in range(LAYERS)}
    weighted, plain = _types(gqa4, want), _types(gqa4, want, importance="none")
    assert _raised(weighted, base) == v  # every layer's attn_v, with an importance as without
    assert _raised(plain, base) == {**v, "blk.0.ffn_down.weight": Q.Q5_K}  # 8 // 8 = 1: blk.0's alone
    assert weighted["output.weight"] == plain["token_embd.weight"] == Q.Q6_K  # as before: the output head's type
    assert plan(open_model(gqa4), gqa4 / "unused.gguf", GgufConfig(tensor_type=want)).file_type == f"MOSTLY_{base.name}"

    # n_gqa = 4 / 2 = 2: no attn_v rule; blk.0's ffn_down (rows of 320) Q5_K's fallback Q5_1, the others IQ4_NL
    weighted, plain = _types(llama, want), _types(llama, want, importance="none")
    fallback = {f"blk.{i}.ffn_down.weight": Q.IQ4_NL for i in range(LAYERS)} if want == "iq4_xs" else {}
    assert _raised(weighted, base) == fallback
    assert _raised(plain, base) == {**fallback, "blk.0.ffn_down.weight": Q.Q5_1}


def test_an_iq4_xs_file_is_typed_iq4_xs_where_most_rows_fall_back_to_iq4_nl(tmp_path):
    """Rows of 64 and 128: every matrix IQ4_NL (llama-quantize's fallback); the file type is the one asked for, as
    llama-quantize writes it."""
    model = zoo.save_llama(tmp_path / "narrow")
    p = plan(open_model(model), tmp_path / "unused.gguf", GgufConfig(tensor_type="iq4_xs"))
    assert {t.qtype for t in p.tensors if len(t.shape) > 1 and t.name.startswith("blk.")} == {Q.IQ4_NL}
    assert p.file_type == "MOSTLY_IQ4_XS"


def test_iq4_xs_q5_k_matrices_are_fitted_to_the_importance_and_the_file_reads_back(gqa4, calib_file, tmp_path):
    """With the measured importance: attn_v in Q5_K, its blocks fitted to the importance (as llama-quantize
    --imatrix fits them), ffn_down in IQ4_XS; the file reads back in transformers."""
    from sparsify.algorithms.kquants import dequantize_k, quantize_k
    from sparsify.export.importance import input_importance

    out = tmp_path / "iq4_xs.gguf"
    args = ["--calib", calib_file, "--samples", "4", "--seq-len", "32", "--seed", "3", "--json"]
    r = run("export", "gguf", gqa4, "-o", out, "--type", "iq4_xs", *args)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["types"] == {"F32": 17, "IQ4_XS": 48, "Q5_K": 8, "Q6_K": 2}
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["blk.0.ffn_down.weight"].tensor_type == Q.IQ4_XS  # with an imatrix: no ffn_down rule
    file_type = reader.fields["general.file_type"]
    assert int(file_type.parts[file_type.data[0]][0]) == gguf.LlamaFileType.MOSTLY_IQ4_XS

    imp = input_importance(open_model(gqa4), str(calib_file), samples=4, seq_len=32, seed=3)
    source = T.AutoModelForCausalLM.from_pretrained(gqa4).eval()
    state = source.state_dict()
    for i in (0, LAYERS - 1):
        t = tensors[f"blk.{i}.attn_v.weight"]
        assert t.tensor_type == Q.Q5_K
        w = state[f"model.layers.{i}.self_attn.v_proj.weight"]
        decoded = torch.from_numpy(gguf_dequantize(t.data, Q.Q5_K).copy()).reshape(w.shape)
        fitted = dequantize_k(quantize_k(w, "q5_k", imp[f"model.layers.{i}.self_attn.v_proj"]))
        assert torch.equal(decoded, fitted), i
        assert not torch.equal(fitted, dequantize_k(quantize_k(w, "q5_k")))  # the importance changed the blocks

    loaded = T.AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    ids = torch.randint(3, zoo.VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p, q = source(ids).logits.log_softmax(-1), loaded(ids).logits.log_softmax(-1)
    assert 0 < float((p.exp() * (p - q)).sum(-1).mean()) < 0.05


def test_phi3s_fused_attn_qkv_takes_the_attn_v_rules(tmp_path):
    """llama.cpp's category_is_attn_v: Phi-3's attn_qkv in Q5_K in an IQ4 file with n_gqa = 8 / 2, and in Q6_K where
    use_more_bits gives attn_v Q6_K in a Q4_K_M file (layer 1 of 2)."""
    config = T.Phi3Config(**{**zoo._COMMON, "hidden_size": 256, "intermediate_size": 256, "num_attention_heads": 8,
                             "num_key_value_heads": 2}, **zoo._IDS)  # fmt: skip
    torch.manual_seed(0)
    T.Phi3ForCausalLM(config).save_pretrained(tmp_path / "phi3")
    zoo.tokenizer().save_pretrained(tmp_path / "phi3")
    iq4, mix = _types(tmp_path / "phi3", "iq4_nl"), _types(tmp_path / "phi3", "q4_k_m")
    assert [iq4[f"blk.{i}.attn_qkv.weight"] for i in range(2)] == [Q.Q5_K] * 2
    assert [mix[f"blk.{i}.attn_qkv.weight"] for i in range(2)] == [Q.Q4_K, Q.Q6_K]
    assert iq4["blk.0.attn_output.weight"] == iq4["blk.0.ffn_up.weight"] == Q.IQ4_NL
