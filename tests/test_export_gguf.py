"""``sparsify export gguf``: metadata as llama.cpp reads it, weights that give the source's logits (transformers
loads GGUF: it dequantizes and undoes the q/k permutation), quantized layouts as stored (the block bytes decode
to our own integers and scales), refusals before anything is written, and sparsify's outputs exported."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as T

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import GGUFReader  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

from sparsify.errors import SparsifyError  # noqa: E402
from sparsify.export import export  # noqa: E402
from sparsify.recipe import parse_recipe  # noqa: E402
from tests import zoo  # noqa: E402
from tests.test_cli import assert_user_error, run  # noqa: E402
from tests.zoo import compress  # noqa: E402

CALIB = {"samples": 4, "seq_len": 32, "batch_size": 4}
IDS = torch.randint(3, zoo.VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
        "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3"}  # fmt: skip
# transformers' GGUF loader reads too few keys for these (head_dim, expert sizes, Gemma's query_pre_attn_scalar):
# it is given the source config; the keys themselves are checked in test_metadata_is_what_llama_cpp_reads
TRANSFORMERS_CONFIG = {"qwen3", "qwen3_moe", "gemma2", "gemma3_text"}
NO_TRANSFORMERS = {"gemma", "mixtral"}  # transformers cannot load these from GGUF: tensors compared directly


def _recipe(*steps: dict, calibrate: bool = True):
    return parse_recipe({"calibration": CALIB, "passes": list(steps)} if calibrate else {"passes": list(steps)})


@pytest.fixture(scope="module")
def source(model_dir, tmp_path_factory):
    """A tiny model per family; Gemma 2 and 3 with queries scaled by 1/sqrt(head_dim), what llama.cpp assumes."""
    made = {}

    def get(family: str, dtype: torch.dtype = torch.float32):
        if family not in ("gemma2", "gemma3_text"):
            return model_dir(family, dtype)
        if family not in made:
            config = zoo.CONFIGS[family]()
            config.query_pre_attn_scalar = config.head_dim
            torch.manual_seed(0)
            folder = tmp_path_factory.mktemp(family)
            T.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
            zoo.tokenizer().save_pretrained(folder)
            made[family] = folder
        return made[family]

    return get


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def _from_gguf(path, src=None):
    """The GGUF file loaded by transformers (dequantized, q/k un-permuted), float32."""
    config = {"config": T.AutoConfig.from_pretrained(src)} if src is not None else {}
    return T.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, **config)


def _source_logits(src) -> torch.Tensor:
    return _logits(T.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32))


def _fields(path) -> dict:
    reader = GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()}


def _tensors(path) -> dict[str, tuple[np.ndarray, Q]]:
    """Each GGUF tensor dequantized to float32 in PyTorch's (rows, cols) order, and its type."""
    return {t.name: (dequantize(t.data, t.tensor_type), t.tensor_type) for t in GGUFReader(path).tensors}


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order back to Hugging Face's (the inverse of convert_hf_to_gguf's permute)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ------------------------------------------------------------------------------------------------- families


@pytest.mark.parametrize("family", list(ARCH))
def test_float_export_gives_the_source_logits(family, source, tmp_path):
    src, out = source(family), tmp_path / "m.gguf"
    summary = export(src, out, tensor_type="f32")
    assert summary["types"] == {"F32": summary["tensors"]} and summary["architecture"] == ARCH[family]
    if family in NO_TRANSFORMERS:  # Gemma: norms written as 1 + w, the rest as it is
        ref = T.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).state_dict()
        got = _tensors(out)
        assert np.array_equal(got["blk.0.attn_norm.weight"][0], ref["model.layers.0.input_layernorm.weight"] + 1)
        assert np.array_equal(got["blk.1.ffn_down.weight"][0], ref["model.layers.1.mlp.down_proj.weight"])
        assert np.array_equal(got["token_embd.weight"][0], ref["model.embed_tokens.weight"])
        return
    loaded = _from_gguf(out, src if family in TRANSFORMERS_CONFIG else None)
    torch.testing.assert_close(_logits(loaded), _source_logits(src), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gemma3_text", "phi3"])
def test_metadata_is_what_llama_cpp_reads(family, source, tmp_path):
    src, out = source(family), tmp_path / "m.gguf"
    export(src, out)
    f, cfg, tok = _fields(out), T.AutoConfig.from_pretrained(src), zoo.tokenizer()
    arch = ARCH[family]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    assert f["general.architecture"] == arch
    assert f[f"{arch}.context_length"] == cfg.max_position_embeddings
    assert f[f"{arch}.block_count"] == cfg.num_hidden_layers
    assert f[f"{arch}.embedding_length"] == cfg.hidden_size
    assert f[f"{arch}.feed_forward_length"] == cfg.intermediate_size
    assert f[f"{arch}.attention.head_count"] == cfg.num_attention_heads
    assert f[f"{arch}.attention.head_count_kv"] == cfg.num_key_value_heads
    assert f[f"{arch}.attention.key_length"] == head_dim == f[f"{arch}.rope.dimension_count"]
    assert f[f"{arch}.rope.freq_base"] == pytest.approx(rope["rope_theta"])
    assert f[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    if family == "gemma2":
        assert f["gemma2.attn_logit_softcapping"] == pytest.approx(cfg.attn_logit_softcapping)
        assert f["gemma2.final_logit_softcapping"] == pytest.approx(cfg.final_logit_softcapping)
    if family in ("gemma2", "gemma3_text"):
        assert f[f"{arch}.attention.sliding_window"] == cfg.sliding_window
    vocab = tok.get_vocab()
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert f["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert len(f["tokenizer.ggml.merges"]) == len(json.loads(tok.backend_tokenizer.to_str())["model"]["merges"])
    types = f["tokenizer.ggml.token_type"]
    assert types[:3] == [3, 3, 3] and set(types[3:]) == {1}  # <pad> <s> </s> are control tokens
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (tok.bos_token_id, tok.eos_token_id)
    assert f["tokenizer.ggml.padding_token_id"] == tok.pad_token_id
    assert f["tokenizer.ggml.add_bos_token"] is False and f["tokenizer.ggml.add_eos_token"] is False  # as it encodes
    assert f["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16  # auto: a float32 model's matrices in f16
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in GGUFReader(out).tensors}  # ggml order: (in, out)
    q, kv = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    if family == "phi3":  # fused, as llama.cpp's phi3 reads them
        assert shapes["blk.0.attn_qkv.weight"] == (cfg.hidden_size, q + 2 * kv)
        assert shapes["blk.0.ffn_up.weight"] == (cfg.hidden_size, 2 * cfg.intermediate_size)
    else:
        assert shapes["blk.0.attn_q.weight"] == (cfg.hidden_size, q)
        assert shapes["blk.0.attn_k.weight"] == (cfg.hidden_size, kv)
        assert shapes["blk.0.ffn_gate.weight"] == (cfg.hidden_size, cfg.intermediate_size)
    assert shapes["token_embd.weight"] == (cfg.hidden_size, cfg.vocab_size)


def test_q_k_rows_are_permuted_for_llama_only(source, tmp_path):
    for family, permuted in (("llama", True), ("qwen2", False)):
        src, out = source(family), tmp_path / f"{family}.gguf"
        export(src, out, tensor_type="f32")
        ref = T.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).state_dict()
        q = _tensors(out)["blk.0.attn_q.weight"][0]
        hf = ref["model.layers.0.self_attn.q_proj.weight"].numpy()
        assert np.array_equal(_unpermute(q, 4) if permuted else q, hf)
        assert not np.array_equal(q, hf) if permuted else True


# --------------------------------------------------------------------------------------------------- quantized


@pytest.fixture(scope="module")
def quantized(source, tmp_path_factory):
    """Quantized outputs of an fp16 Llama (fp16 scales: GGUF's own scale type), keyed by name."""
    root = tmp_path_factory.mktemp("quantized")
    src = source("llama", torch.float16)
    steps = {
        "w4": {"scheme": "w4a16", "group_size": 32},
        "w4-asym": {"scheme": "w4a16", "group_size": 32, "symmetric": False},
        "w8": {"scheme": "w8a16", "group_size": 32},
        "w4-g64": {"scheme": "w4a16", "group_size": 64},
        "w4-default": {"scheme": "w4a16"},  # hidden 64: 128 does not divide it, so groups of 32
        "w8a8": {"scheme": "w8a8"},
    }
    made = {}

    def get(name: str):
        if name not in made:
            made[name] = root / name
            compress(src, _recipe({"type": "quantize", "method": "rtn", **steps[name]}), made[name])
        return made[name]

    return get


def _ct_weights(path) -> dict[str, torch.Tensor]:
    """Each quantized Linear of the compressed-tensors checkpoint dequantized in float32, ``(q - zp) * scale``,
    from the integers and scales sparsify's runtime reads."""
    import sparsify
    from sparsify.runtime.quantized import QuantizedLinear

    def dense(m: QuantizedLinear) -> torch.Tensor:
        q, zp = m.codes().float(), m.zero_point().float()  # (out, in), (out, groups)
        s = m.weight_scale.float()  # (out, groups)
        g = q.shape[1] // s.shape[1]
        return ((q.unflatten(1, (-1, g)) - zp.unsqueeze(-1)) * s.unsqueeze(-1)).flatten(1)  # (out, in)

    model = sparsify.load(path, kernel="reference")
    return {f"{n}.weight": dense(m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


@pytest.mark.parametrize(("name", "qtype"), [("w4", Q.Q4_0), ("w4-asym", Q.Q4_1), ("w8", Q.Q8_0)])
def test_quantized_is_exported_as_stored(name, qtype, quantized, tmp_path):
    src, out = quantized(name), tmp_path / "m.gguf"
    summary = export(src, out)
    assert summary["types"][qtype.name] == summary["as_stored"] == 14 and summary["requantized"] == 0
    got, ref = _tensors(out), _ct_weights(src)
    for layer in range(2):
        for gguf_name, hf, heads in (("attn_q", "self_attn.q_proj", 4), ("attn_k", "self_attn.k_proj", 2),
                                     ("attn_v", "self_attn.v_proj", 0), ("ffn_down", "mlp.down_proj", 0)):  # fmt: skip
            w, t = got[f"blk.{layer}.{gguf_name}.weight"]
            assert t == qtype
            w = _unpermute(w, heads) if heads else w
            want = ref[f"model.layers.{layer}.{hf}.weight"].numpy()
            if qtype == Q.Q4_1:  # the block minimum -(8 + zp) * scale is fp16: rounded, and said so
                np.testing.assert_allclose(w, want, rtol=0, atol=float(np.abs(want).max()) * 2**-10)
            else:  # fp16 scales and our integers: bit for bit
                assert np.array_equal(w, want), (name, layer, gguf_name)
    if qtype == Q.Q4_1:
        assert any("Q4_1 block minimums" in n for n in summary["notes"])
    else:
        assert summary["notes"] == []
        torch.testing.assert_close(_logits(_from_gguf(out)), _source_logits(src), rtol=0, atol=0)


def test_the_default_w4a16_group_of_a_model_128_does_not_divide_exports_as_stored(quantized, tmp_path):
    """SmolLM2's case (hidden 576; here 64): w4a16's default group size is GGUF's block, so nothing is rounded
    again."""
    summary = export(quantized("w4-default"), tmp_path / "m.gguf")
    assert summary["types"]["Q4_0"] == summary["as_stored"] == 14 and summary["requantized"] == 0
    assert summary["notes"] == []


def test_other_layouts_are_requantized_with_a_note(quantized, tmp_path):
    summary = export(quantized("w4-g64"), tmp_path / "g64.gguf")
    assert summary["requantized"] == 14 and summary["types"]["Q4_0"] == 14
    assert any("int4 symmetric in groups of 64" in n and "to Q4_0" in n for n in summary["notes"]), summary["notes"]
    assert any("--group-size 32: int4 weights then export as stored" in n for n in summary["notes"])
    summary = export(quantized("w8a8"), tmp_path / "w8a8.gguf")
    assert summary["requantized"] == 14 and summary["types"]["Q8_0"] == 14
    assert any("per channel to Q8_0" in n for n in summary["notes"])
    assert any("activation quantization (W8A8) is not carried over" in n for n in summary["notes"])
    summary = export(quantized("w4"), tmp_path / "q8.gguf", tensor_type="q8_0")  # asked for another type
    assert summary["requantized"] == 14 and any("--type q8_0 asks for another type" in n for n in summary["notes"])
    summary = export(quantized("w4"), tmp_path / "f16.gguf", tensor_type="f16")
    assert summary["types"]["F16"] == 16 and any("14 quantized tensors written dequantized" in n
                                                 for n in summary["notes"])  # fmt: skip


def test_float_model_quantized_by_type(source, tmp_path):
    src = source("llama")
    for kind, qtype in (("q8_0", Q.Q8_0), ("q4_0", Q.Q4_0), ("q4_1", Q.Q4_1), ("bf16", Q.BF16)):
        summary = export(src, tmp_path / f"{kind}.gguf", tensor_type=kind)
        assert summary["types"]["F32"] == 5  # norms stay F32
        if kind.startswith("q4"):  # the output head in Q8_0 (rows of 64: not whole super-blocks of 256 for Q6_K),
            # the untied embedding in the file's type, as llama-quantize gives them
            assert summary["types"][qtype.name] == 15 and summary["types"]["Q8_0"] == 1
        else:
            assert summary["types"][qtype.name] == 16
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(_logits(_from_gguf(tmp_path / "q8_0.gguf")), _source_logits(src)) < 0.02


# ------------------------------------------------------------------------------------------- sparsify outputs


def test_pruned_and_structured_outputs_export(source, tmp_path):
    src = source("llama")
    for name, step in (
        ("pruned", {"type": "prune", "method": "wanda", "sparsity": 0.5}),
        ("channels", {"type": "prune", "structured": "channels", "ratio": 0.5, "metric": "wanda"}),
    ):
        out = tmp_path / name
        compress(src, _recipe(step), out)
        export(out, tmp_path / f"{name}.gguf", tensor_type="f32")
        torch.testing.assert_close(
            _logits(_from_gguf(tmp_path / f"{name}.gguf")), _source_logits(out), rtol=0, atol=1e-5
        )
    f = _fields(tmp_path / "channels.gguf")
    assert f["llama.feed_forward_length"] == T.AutoConfig.from_pretrained(tmp_path / "channels").intermediate_size < 128


def test_moe_outputs_export_with_stacked_experts(source, tmp_path):
    mixtral, qwen3_moe = tmp_path / "mixtral", tmp_path / "qwen3_moe"
    compress(source("llama"), _recipe({"type": "moe", "experts": 4, "top_k": 2}), mixtral)
    compress(source("qwen3"), _recipe({"type": "moe", "experts": 4, "top_k": 2}), qwen3_moe)

    export(mixtral, tmp_path / "mixtral.gguf", tensor_type="f32")  # transformers cannot read Mixtral GGUF
    f, got = _fields(tmp_path / "mixtral.gguf"), _tensors(tmp_path / "mixtral.gguf")
    assert (f["general.architecture"], f["llama.expert_count"], f["llama.expert_used_count"]) == ("llama", 4, 2)
    ref = T.AutoModelForCausalLM.from_pretrained(mixtral, dtype=torch.float32).state_dict()
    gate_up = ref["model.layers.1.mlp.experts.gate_up_proj"].numpy()  # transformers fuses them: (E, 2 * ff, in)
    ff = gate_up.shape[1] // 2
    assert np.array_equal(got["blk.1.ffn_gate_exps.weight"][0], gate_up[:, :ff])
    assert np.array_equal(got["blk.1.ffn_up_exps.weight"][0], gate_up[:, ff:])
    assert np.array_equal(got["blk.1.ffn_down_exps.weight"][0], ref["model.layers.1.mlp.experts.down_proj"].numpy())
    assert np.array_equal(got["blk.1.ffn_gate_inp.weight"][0], ref["model.layers.1.mlp.gate.weight"].numpy())

    export(qwen3_moe, tmp_path / "qwen3_moe.gguf", tensor_type="f32")
    f = _fields(tmp_path / "qwen3_moe.gguf")
    assert f["qwen3moe.expert_feed_forward_length"] == T.AutoConfig.from_pretrained(qwen3_moe).moe_intermediate_size
    loaded = _from_gguf(tmp_path / "qwen3_moe.gguf", qwen3_moe)
    torch.testing.assert_close(_logits(loaded), _source_logits(qwen3_moe), rtol=0, atol=1e-5)


def test_quantized_moe_experts_stack_as_stored(source, tmp_path):
    out = tmp_path / "moe-w4"
    steps = ({"type": "moe", "experts": 4, "top_k": 2}, {"type": "quantize", "scheme": "w4a16", "group_size": 32,
                                                          "method": "rtn"})  # fmt: skip
    compress(source("qwen3"), _recipe(*steps), out)
    summary = export(out, tmp_path / "moe.gguf")
    got = _tensors(tmp_path / "moe.gguf")
    w, t = got["blk.0.ffn_down_exps.weight"]
    assert t == Q.Q4_0 and w.shape == (4, 64, 32)
    ref = torch.stack([_ct_weights(out)[f"model.layers.0.mlp.experts.{e}.down_proj.weight"] for e in range(4)]).numpy()
    np.testing.assert_allclose(w, ref, rtol=0, atol=float(np.abs(ref).max()) * 2**-10)  # float32 scales: fp16
    assert any("not exactly fp16" in n for n in summary["notes"])


# ------------------------------------------------------------------------------------------------- refusals


def _no_output(folder) -> None:
    assert not [p for p in folder.iterdir() if p.suffix in (".gguf", ".partial") or p.name.startswith(".")]


def test_refusals_are_one_line_and_write_nothing(source, model_dir, tmp_path):
    out = tmp_path / "x.gguf"
    sinks = tmp_path / "sinks"
    compress(source("llama"), _recipe({"type": "attention", "pattern": "sinks", "window": 8, "sinks": 2},
                                      calibrate=False), sinks)  # fmt: skip
    assert_user_error(run("export", "gguf", sinks, "-o", out), out, "only in sparsify's runtime")
    bigbird = tmp_path / "bigbird"
    compress(source("llama"), _recipe({"type": "attention", "pattern": "block-sparse", "block_size": 8},
                                      calibrate=False), bigbird)  # fmt: skip
    assert_user_error(run("export", "gguf", bigbird, "-o", out), out, "only in sparsify's runtime")
    assert_user_error(run("export", "gguf", model_dir("gpt2"), "-o", out), out, "no architecture", "'gpt2'")
    assert_user_error(run("export", "gguf", source("llama"), "-o", out, "--type", "q4_k_xl"), out, "--type")
    assert_user_error(run("export", "gguf", source("llama"), "-o", tmp_path / "x.bin"), None, "does not end in .gguf")
    gemma2 = model_dir("gemma2")  # query_pre_attn_scalar 256 with head_dim 16: llama.cpp would scale by 1/4
    assert_user_error(run("export", "gguf", gemma2, "-o", out), out, "query_pre_attn_scalar is 256", "head_dim")
    _no_output(tmp_path)

    out.write_bytes(b"mine")
    assert_user_error(run("export", "gguf", source("llama"), "-o", out), None, "exists", "--overwrite")
    assert out.read_bytes() == b"mine"
    result = run("export", "gguf", source("llama"), "-o", out, "--overwrite", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["path"] == str(out) and summary["bytes"] == out.stat().st_size > 4
    assert summary["types"] == {"F16": 16, "F32": 5} and summary["requantized"] == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_refused_windows_and_routing(source, tmp_path):
    window = tmp_path / "window"
    compress(source("llama"), _recipe({"type": "attention", "pattern": "sliding-window", "window": 16},
                                      calibrate=False), window)  # fmt: skip
    with pytest.raises(SparsifyError, match="runs no sliding window"):
        export(window, tmp_path / "w.gguf")
    qmoe = tmp_path / "qwen2_moe"  # sparsify's Qwen2-MoE renormalises the top-k weights; llama.cpp's never does
    compress(source("llama"), _recipe({"type": "moe", "experts": 4, "top_k": 2, "shared": 1}), qmoe)
    with pytest.raises(SparsifyError, match="norm_topk_prob"):
        export(qmoe, tmp_path / "q.gguf")
    _no_output(tmp_path)


def test_gemma_settings_llama_cpp_fixes():
    """llama.cpp scales Gemma's queries by 1/sqrt(head_dim), but by 1/sqrt(hidden / heads) at the 27B depths."""
    from sparsify.arch import GGUF_ARCHITECTURES
    from sparsify.export.gguf_plan import _check_config

    for family, cls, depth in (("gemma2", T.Gemma2Config, 46), ("gemma3_text", T.Gemma3TextConfig, 62)):
        fam = GGUF_ARCHITECTURES[family]
        wide = dict(hidden_size=64, num_attention_heads=4, head_dim=8, query_pre_attn_scalar=16)  # hidden / heads
        _check_config(cls(**wide, num_hidden_layers=depth), fam)
        with pytest.raises(SparsifyError, match="query_pre_attn_scalar is 16"):
            _check_config(cls(**wide, num_hidden_layers=depth - 1), fam)
        _check_config(cls(**{**wide, "query_pre_attn_scalar": 8}, num_hidden_layers=depth - 1), fam)
    with pytest.raises(SparsifyError, match=r"mlp_only_layers is \[1\] but llama.cpp's qwen3moe assumes \[\]"):
        _check_config(T.Qwen3MoeConfig(norm_topk_prob=True, mlp_only_layers=[1]), GGUF_ARCHITECTURES["qwen3_moe"])
    with pytest.raises(SparsifyError, match=r"final_logit_softcapping is 30\.0 but .* gemma3 assumes None"):
        _check_config(T.Gemma3TextConfig(head_dim=256, final_logit_softcapping=30.0), GGUF_ARCHITECTURES["gemma3_text"])


def test_llama3_rope_scaling_as_rope_freqs(tmp_path):
    """Llama 3's RoPE scaling as llama.cpp reads it: frequencies divided by ``rope_freqs``; the divided ones are
    transformers' own."""
    src = zoo.save_llama3(tmp_path / "llama3")
    model = T.AutoModelForCausalLM.from_pretrained(src)  # its rotary frequencies, as transformers scales them
    config = model.config
    export(src, tmp_path / "m.gguf")
    divisors = torch.from_numpy(_tensors(tmp_path / "m.gguf")["rope_freqs.weight"][0].copy())
    dim = config.hidden_size // config.num_attention_heads
    plain = 1.0 / 500000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    torch.testing.assert_close(plain / divisors, model.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
    assert divisors.max() == 8 and divisors.min() < 8  # long wavelengths by the whole factor, one smoothly


def test_windows_llama_cpp_can_run():
    """Gemma 2 and 3 run their window on a fixed pattern of layers in llama.cpp; Llama, Mistral, Qwen and Phi-3
    run none. A window that covers the whole context is no window."""
    from sparsify.arch import GGUF_ARCHITECTURES as G
    from sparsify.export.gguf_plan import _check_config

    small = dict(num_hidden_layers=4, max_position_embeddings=256)
    _check_config(T.Gemma2Config(**small, sliding_window=16, head_dim=256), G["gemma2"])  # sliding, full, ...
    _check_config(T.Gemma3TextConfig(**small, sliding_window=16, head_dim=256), G["gemma3_text"])  # 5 of 6
    _check_config(T.MistralConfig(**small, sliding_window=256), G["mistral"])  # the whole context
    everywhere = ["sliding_attention"] * 4
    with pytest.raises(SparsifyError, match="its pattern is every-2"):
        _check_config(T.Gemma2Config(**small, sliding_window=16, head_dim=256, layer_types=everywhere), G["gemma2"])
    for cfg, family in ((T.MistralConfig(**small, sliding_window=16), "mistral"),
                        (T.Phi3Config(**small, sliding_window=16), "phi3")):  # fmt: skip
        with pytest.raises(SparsifyError, match="runs no sliding window"):
            _check_config(cfg, G[family])


def _spm_tokenizer() -> T.PreTrainedTokenizerFast:
    """A SentencePiece-style BPE (byte fallback, "▁" for spaces, BOS added), as Llama 2 and Gemma have."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])  # fmt: skip
    specials = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256))]
    tok.train_from_iterator(zoo.training_text(), trainers.BpeTrainer(vocab_size=600, special_tokens=specials))
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                     add_bos_token=True)  # fmt: skip


def test_sentencepiece_style_tokenizer(tmp_path):
    """Scores from the merge ranks: the tokenizer transformers rebuilds from the GGUF (by those scores, as llama.cpp
    merges) encodes as the source does; byte, unknown and control tokens typed; BOS added as the source adds it."""
    tok, folder = _spm_tokenizer(), tmp_path / "spm"
    config = zoo.CONFIGS["llama"]()
    config.vocab_size = len(tok)
    T.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    export(folder, tmp_path / "m.gguf")
    f = _fields(tmp_path / "m.gguf")
    assert f["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.pre" not in f
    assert f["tokenizer.ggml.token_type"][:5] == [2, 3, 3, 6, 6]  # <unk> <s> </s> <0x00> <0x01>
    assert f["tokenizer.ggml.add_bos_token"] is True and f["tokenizer.ggml.add_space_prefix"] is True
    rebuilt = T.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in [*zoo.training_text()[:4], "héllo wörld, 日本"]:
        assert rebuilt(text)["input_ids"] == tok(text)["input_ids"]

    small = tmp_path / "small"  # a tokenizer with more ids than the model has rows
    zoo.build("llama").save_pretrained(small)
    tok.save_pretrained(small)
    with pytest.raises(SparsifyError, match="beyond the model's vocab_size 320"):
        export(small, tmp_path / "small.gguf")


def test_export_is_in_the_help_and_made_from_the_registry():
    from sparsify.export import FORMATS

    assert "export" in run("-h").stdout
    listed = run("export", "-h")
    assert listed.exit_code == 0 and all(name in listed.stdout for name in FORMATS)
    text = " ".join(run("export", "gguf", "-h").stdout.split()).replace("python -m ", "")
    assert "Usage: sparsify export gguf MODEL [OPTIONS]" in text
    assert (
        "--type auto|f32|f16|bf16|q8_0|q6_k|q5_k|q5_1|q5_0|q4_k|q4_1|q4_0|q3_k|q2_k" in text
        and "--overwrite" in text
        and "--json" in text
    )


def test_blocks_are_ggml_layout_byte_for_byte():
    """Codes whose blocks each reach the end of the range: gguf's own quantizer finds the same scale and codes,
    so its bytes must be ours."""
    from sparsify.export import ggml_blocks

    g = torch.Generator().manual_seed(0)
    scale = (torch.rand(6, 4, generator=g) * 0.02 + 0.001).half()  # (rows, blocks)
    for qtype, low, high, end in ((Q.Q4_0, -8, 8, -8), (Q.Q8_0, -127, 128, 127)):
        codes = torch.randint(low, high, (6, 128), generator=g, dtype=torch.int16)
        codes[:, ::32] = end  # each block's largest magnitude
        x = (codes.float().unflatten(1, (4, 32)) * scale.float().unsqueeze(-1)).flatten(1).numpy()
        ours = ggml_blocks.q4_0(codes, scale) if qtype == Q.Q4_0 else ggml_blocks.q8_0(codes, scale)
        assert np.array_equal(ours, gguf.quants.quantize(x, qtype)), qtype.name
        assert np.array_equal(dequantize(ours, qtype), x)
    zp = torch.randint(-8, 8, (6, 4), generator=g, dtype=torch.int16)
    codes = torch.randint(-8, 8, (6, 128), generator=g, dtype=torch.int16)
    want = ((codes.float().unflatten(1, (4, 32)) - zp.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)).flatten(1)
    m = ggml_blocks.q4_1_min(scale, zp).half().float()  # the fp16 minimum is the only rounding
    got = dequantize(ggml_blocks.q4_1(codes, scale, zp), Q.Q4_1)
    np.testing.assert_allclose(
        got, want.numpy(), rtol=0, atol=float((m - ggml_blocks.q4_1_min(scale, zp)).abs().max()) + 1e-7
    )


def test_a_failure_while_writing_leaves_nothing(source, tmp_path, monkeypatch):
    from sparsify.export import gguf as writer

    calls = []

    def failing(t, w):
        calls.append(t.name)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return encode(t, w)

    encode = writer._encode
    monkeypatch.setattr(writer, "_encode", failing)
    out = tmp_path / "m.gguf"
    assert_user_error(run("export", "gguf", source("llama"), "-o", out), out, "disk full")
    assert list(tmp_path.iterdir()) == []


def test_pruned_then_quantized_keeps_its_zeros(source, tmp_path):
    """Wanda 50% then int4 in groups of 32: Q4_0 as stored, and the pruned weights are exact zeros in the file."""
    out = tmp_path / "pruned-w4"
    steps = ({"type": "prune", "method": "wanda", "sparsity": 0.5},
             {"type": "quantize", "scheme": "w4a16", "group_size": 32, "method": "rtn"})  # fmt: skip
    compress(source("llama", torch.float16), _recipe(*steps), out)
    summary = export(out, tmp_path / "m.gguf")
    assert summary["as_stored"] == 14 and summary["notes"] == []
    w, t = _tensors(tmp_path / "m.gguf")["blk.1.ffn_up.weight"]
    assert t == Q.Q4_0 and (w == 0).mean() >= 0.5


def test_auto_keeps_16_bit_floats(source, tmp_path):
    """auto: a bf16 checkpoint's matrices in BF16, a float16 one's in F16, bit for bit; norms in F32."""
    for dtype, qtype in ((torch.bfloat16, Q.BF16), (torch.float16, Q.F16)):
        src, out = source("llama", dtype), tmp_path / f"{qtype.name}.gguf"
        assert export(src, out)["types"] == {qtype.name: 16, "F32": 5}
        w = _tensors(out)["blk.0.ffn_down.weight"][0]
        ref = T.AutoModelForCausalLM.from_pretrained(src, dtype=dtype).state_dict()[
            "model.layers.0.mlp.down_proj.weight"
        ]
        assert np.array_equal(w, ref.float().numpy())


# ---------------------------------------------------------------------------------------- inputs and leftovers


@pytest.fixture
def gguf_input(source, tmp_path, monkeypatch):
    """A .gguf file to export from (sparsify converts it once, into a cache of this test's own)."""
    monkeypatch.setenv("SPARSIFY_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "in" / "model.gguf"
    path.parent.mkdir()
    export(source("llama"), path, tensor_type="f32")
    return path


def test_the_output_is_never_the_input_file(gguf_input, tmp_path):
    """-o naming the .gguf being exported is refused, --overwrite or not, through a symlink too: never replaced."""
    data = gguf_input.read_bytes()
    link, hard = tmp_path / "link.gguf", tmp_path / "hard.gguf"
    link.symlink_to(gguf_input)
    hard.hardlink_to(gguf_input)
    for out in (gguf_input, link, hard):
        for flags in ((), ("--overwrite",)):
            result = run("export", "gguf", gguf_input, "-o", out, *flags)
            assert_user_error(result, None, f"{out} is the input model", "choose another file")
    assert gguf_input.read_bytes() == data and link.is_symlink()
    assert sorted(p.name for p in gguf_input.parent.iterdir()) == ["model.gguf"]


def test_without_o_nothing_is_written(source):
    """-o is required: the file is never put into the model folder (or anywhere else) on its own."""
    src = source("llama")
    before = sorted(p.name for p in src.iterdir())
    result = run("export", "gguf", src)
    assert result.exit_code == 2 and "--output" in result.stderr
    assert sorted(p.name for p in src.iterdir()) == before


def test_a_gguf_input_loads_quietly(gguf_input, tmp_path):
    """Reading a .gguf goes through transformers, whose own tqdm bar would leak onto stderr: silenced. The float32
    copy it is converted to, once, is announced with its size and how to free it; the second read says nothing."""
    result = run("export", "gguf", gguf_input, "-o", tmp_path / "out.gguf")
    assert result.exit_code == 0, result.output
    assert "Converting" not in result.stderr and "it/s" not in result.stderr, result.stderr
    (note,) = [line for line in result.stderr.splitlines() if not line.startswith("writing GGUF")]
    assert note.startswith("note: model.gguf converted to float32") and "sparsify cache --clear" in note, note
    assert "KiB kept in" in note or "MiB kept in" in note, note
    again = run("export", "gguf", gguf_input, "-o", tmp_path / "again.gguf")
    assert [line for line in again.stderr.splitlines() if not line.startswith("writing GGUF")] == []


@pytest.mark.slow  # a killed process
def test_stale_partials_of_dead_exports_are_removed(source, tmp_path):
    """A SIGKILLed export leaves its temporary file; the next export of the same file removes it, but not one a
    live export holds, one of another file, or a file of the user's that merely looks alike."""
    import fcntl
    import os
    import subprocess
    import sys
    from pathlib import Path

    src, out = source("llama"), tmp_path / "m.gguf"
    root = Path(__file__).resolve().parent.parent
    args = ["-m", "tests.faults", "killin@_encode", "--", "export", "gguf", str(src), "-o", str(out)]
    killed = subprocess.run([sys.executable, *args], cwd=root, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    (stale,) = [p for p in tmp_path.iterdir() if p.name.startswith(".m.gguf.")]
    assert stale.name.endswith(".partial") and not out.exists()

    live = tmp_path / ".m.gguf.abcd1234.partial"  # another export's, still being written
    live.write_bytes(b"live")
    keep = [live, tmp_path / ".n.gguf.abcd1234.partial", tmp_path / ".m.gguf.mine.partial"]
    for p in keep[1:]:
        p.write_bytes(b"not this export's")
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run("export", "gguf", src, "-o", out)
        assert result.exit_code == 0, result.output
    finally:
        os.close(fd)
    assert not stale.exists() and all(p.exists() for p in keep)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, *(p.name for p in keep)])


def test_a_malformed_report_beside_the_model_is_not_read(source, tmp_path):
    """Export reads the model's config, weights and tokenizer, never sparsify_report.json: a broken one is ignored."""
    out = tmp_path / "pruned"
    compress(source("llama"), _recipe({"type": "prune", "method": "magnitude", "sparsity": 0.5}, calibrate=False), out)
    for text in ("{not json", "[]", '{"eval": {"seq_len": "<svg onload=alert(1)>"}}'):
        (out / "sparsify_report.json").write_text(text)
        result = run("export", "gguf", out, "-o", tmp_path / "m.gguf", "--overwrite")
        assert result.exit_code == 0, result.output


def test_a_malformed_tokenizer_is_one_line_naming_the_file(source, tmp_path):
    import shutil

    src = tmp_path / "model"
    shutil.copytree(source("llama"), src)
    for text, said in (("{not json", "is not valid JSON"), ("[]", "is not a JSON object")):
        (src / "tokenizer.json").write_text(text)
        out = tmp_path / "m.gguf"
        assert_user_error(run("export", "gguf", src, "-o", out), out, str(src / "tokenizer.json"), said)
