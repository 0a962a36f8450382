"""`sparsify export gguf --type q2_k..q6_k`: llama.cpp's K-quants, packed by us (gguf-py quantizes none of them),
with llama-quantize's fallbacks where rows are not whole super-blocks; what transformers' GGUF loader reads back is
exactly our dequantized weights."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers as T

from sparsify.algorithms.kquants import dequantize_k, quantize_k
from tests import zoo
from tests.test_cli import assert_user_error, run

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """A 1-layer Llama whose rows are whole super-blocks of 256 but the MLP's down projection's (320: whole
    blocks of 32 only), with untied embeddings."""
    return zoo.save_llama(tmp_path_factory.mktemp("wide"), hidden_size=256, intermediate_size=320,
                          num_hidden_layers=1, max_position_embeddings=128)  # fmt: skip


def _expected(name: str, w: torch.Tensor, qtype) -> torch.Tensor:
    """What a weight written in ``qtype`` decodes to: our K-quant, or gguf-py's own rounding for the others."""
    if qtype.name.endswith("_K"):
        return dequantize_k(quantize_k(w, qtype.name.lower()))
    if qtype == Q.F32:
        return w
    data = gguf.quants.quantize(w.numpy(), qtype)
    return torch.from_numpy(gguf.quants.dequantize(data, qtype).copy()).reshape(w.shape)


@pytest.fixture(scope="module")
def exported(wide, tmp_path_factory):
    """Factory: ``wide`` exported in a K type (unweighted: the importance has tests of its own) once per module:
    ``(file, summary)``."""
    made: dict[str, tuple[Path, dict]] = {}

    def get(ktype: str) -> tuple[Path, dict]:
        if ktype not in made:
            out = tmp_path_factory.mktemp(ktype) / "m.gguf"
            r = run("export", "gguf", wide, "-o", out, "--type", ktype, "--importance", "none", "--json")
            assert r.exit_code == 0, r.output
            made[ktype] = out, json.loads(r.stdout)
        return made[ktype]

    return get


# Q2_K, Q5_K share Q4_K's path here (affine sub-blocks), Q3_K Q6_K's (symmetric); test_kquants checks their blocks
@pytest.mark.parametrize("ktype", ["q4_k", "q6_k"])
def test_k_types_read_back_as_our_weights_with_llama_quantizes_fallbacks(wide, exported, ktype):
    out, summary = exported(ktype)
    fallback = {"q2_k": Q.Q4_0, "q3_k": Q.Q4_0, "q4_k": Q.Q5_0, "q5_k": Q.Q5_1, "q6_k": Q.Q8_0}[ktype]
    want = Q[ktype.upper()]
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.0.ffn_gate.weight"] == want
    assert types["blk.0.ffn_down.weight"] == fallback  # rows of 320
    assert types["output.weight"] == types["token_embd.weight"] == Q.Q6_K  # more bits, as llama-quantize gives
    note = f"1 tensors not in {ktype.upper()} (1 {fallback.name}, llama-quantize's fallback): rows of 320"
    assert note in summary["notes"][0], summary["notes"]

    source = T.AutoModelForCausalLM.from_pretrained(wide).eval()
    loaded = T.AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    read = loaded.state_dict()
    gguf_names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                  "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}  # fmt: skip
    expected = {}
    for name, w in source.state_dict().items():
        if w.dim() < 2:
            continue
        short = name.split(".")[-2]
        gname = "output.weight" if name == "lm_head.weight" else "token_embd.weight" if "embed" in name else (
            f"blk.0.{gguf_names[short]}.weight")  # fmt: skip
        expected[name] = _expected(name, w, types[gname])
        assert torch.equal(read[name], expected[name]), name  # bit for bit (q/k rows permuted and back: rows alone)
    ours = T.AutoModelForCausalLM.from_pretrained(wide).eval()
    ours.load_state_dict({**ours.state_dict(), **expected})
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ours(ids).logits)


def test_k_file_type_whole_blocks_and_an_unknown_type(wide, exported, tmp_path):
    reader = gguf.GGUFReader(exported("q4_k")[0])
    field = reader.fields["general.file_type"]
    assert int(field.parts[field.data[0]][0]) == gguf.LlamaFileType.MOSTLY_Q4_K_S
    # every K tensor's bytes are whole ggml blocks of its type
    for t in reader.tensors:
        if t.tensor_type.name.endswith("_K"):
            block, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
            assert np.asarray(t.data).nbytes == int(np.prod(t.shape)) // block * size
    assert_user_error(run("export", "gguf", wide, "-o", tmp_path / "x.gguf", "--type", "q4_km"), None, "q4_km")


# ----------------------------------------------------------------------------------------- the importance


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text("\n\n".join(zoo.training_text()))
    return path


def _naive_importance(folder: Path, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The mean square of every decoder Linear's input columns, by hooks on the whole model's forward."""
    model = T.AutoModelForCausalLM.from_pretrained(folder).eval()
    sums: dict[str, torch.Tensor] = {}
    count = windows.numel()

    def hook(name):
        def record(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()  # (N, in)
            sums[name] = sums.get(name, 0) + (x * x).sum(0)

        return record

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in name:
            m.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        model(windows)
    return {k: (v / count).float() for k, v in sums.items()}


def test_the_importance_is_each_linears_mean_square_input(wide, calib_text):
    from sparsify.checkpoint import open_model
    from sparsify.data import load_text, sample_windows, tokenize
    from sparsify.evaluate import load_tokenizer
    from sparsify.export.importance import input_importance

    md = open_model(wide)
    found = input_importance(md, str(calib_text), samples=4, seq_len=32, seed=3)
    tok = load_tokenizer(wide)
    windows = sample_windows(tokenize(load_text(str(calib_text), tokenizer=tok), tok), 4, 32, 3)
    naive = _naive_importance(wide, windows)
    assert sorted(found) == sorted(naive) and len(found) == 7
    for name, imp in naive.items():
        torch.testing.assert_close(found[name], imp, rtol=1e-4, atol=1e-7)


def test_k_tensors_are_fitted_to_the_importance_and_reproducible(wide, calib_text, tmp_path):
    from sparsify.checkpoint import open_model
    from sparsify.export.importance import input_importance

    args = ["--type", "q4_k", "--calib", calib_text, "--samples", "4", "--seq-len", "32", "--seed", "3"]
    first, again, plain = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    for out in (first, again):
        r = run("export", "gguf", wide, "-o", out, *args, "--json")
        assert r.exit_code == 0, r.output
    assert first.read_bytes() == again.read_bytes()  # the same settings: the same bytes
    assert run("export", "gguf", wide, "-o", plain, "--type", "q4_k", "--importance", "none").exit_code == 0
    assert first.read_bytes() != plain.read_bytes()
    imp = input_importance(open_model(wide), str(calib_text), samples=4, seq_len=32, seed=3)
    w = T.AutoModelForCausalLM.from_pretrained(wide).state_dict()["model.layers.0.mlp.gate_proj.weight"]
    read = {t.name: t for t in gguf.GGUFReader(first).tensors}["blk.0.ffn_gate.weight"]
    decoded = torch.from_numpy(gguf.quants.dequantize(read.data, Q.Q4_K).copy()).reshape(w.shape)
    assert torch.equal(decoded, dequantize_k(quantize_k(w, "q4_k", imp["model.layers.0.mlp.gate_proj"])))
    assert not torch.equal(decoded, dequantize_k(quantize_k(w, "q4_k")))


def _write_imatrix(path: Path, found: dict[str, torch.Tensor], counts: float = 1.0) -> Path:
    """A file as llama-imatrix writes it: per matrix ``<name>.in_sum2`` (experts, in) and ``<name>.counts``."""
    w = gguf.GGUFWriter(path, arch="imatrix")
    for name, imp in found.items():
        w.add_tensor(f"{name}.in_sum2", (imp.double() * counts).float().numpy()[None, :])  # (1, in): one "expert"
        w.add_tensor(f"{name}.counts", np.full((1, 1), counts, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_an_imatrix_file_of_the_measured_importance_gives_the_same_blocks(wide, calib_text, tmp_path):
    """--importance FILE.gguf (llama-imatrix's format) holding what the calibration measures: the very tensors of
    --importance calibration; another model's file, or none, is one line."""
    from sparsify.checkpoint import open_model
    from sparsify.export import GgufConfig
    from sparsify.export.gguf_plan import plan
    from sparsify.export.importance import importance_of, input_importance

    md = open_model(wide)
    tensors = plan(md, tmp_path / "unused.gguf", GgufConfig(tensor_type="q4_k")).tensors
    found = importance_of(tensors, input_importance(md, str(calib_text), samples=4, seq_len=32, seed=3))
    assert len(found) == 7
    imatrix = _write_imatrix(tmp_path / "imatrix.gguf", found)
    measured, read = tmp_path / "m.gguf", tmp_path / "r.gguf"
    args = ["--type", "q4_k", "--calib", calib_text, "--samples", "4", "--seq-len", "32", "--seed", "3"]
    assert run("export", "gguf", wide, "-o", measured, *args).exit_code == 0
    r = run("export", "gguf", wide, "-o", read, "--type", "q4_k", "--importance", imatrix)
    assert r.exit_code == 0, r.output
    a, b = ({t.name: np.asarray(t.data) for t in gguf.GGUFReader(f).tensors} for f in (measured, read))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    other = _write_imatrix(tmp_path / "other.gguf", {"blk.0.ffn_gate.weight": torch.ones(64)})
    out = tmp_path / "x.gguf"
    assert_user_error(run("export", "gguf", wide, "-o", out, "--importance", other, "--type", "q4_k"), out,
                      "other.gguf", "blk.0.ffn_gate.weight", "another model's")  # fmt: skip
    missing = str(tmp_path / "nope.gguf")
    assert_user_error(run("export", "gguf", wide, "-o", out, "--importance", missing), out, "nope.gguf")


def test_legacy_types_are_fitted_to_the_importance_and_unweighted_are_gguf_pys(wide, calib_text, tmp_path):
    """--type q5_0 (and the K types' fallbacks): with importance, llama.cpp's imatrix fit; without, gguf-py's
    reference rounding byte for byte."""
    from sparsify.algorithms.legacy_quants import dequantize_legacy, quantize_legacy
    from sparsify.checkpoint import open_model
    from sparsify.export.importance import input_importance

    weighted, plain = tmp_path / "w.gguf", tmp_path / "p.gguf"
    args = ["--calib", calib_text, "--samples", "4", "--seq-len", "32", "--seed", "3"]
    assert run("export", "gguf", wide, "-o", weighted, "--type", "q5_0", *args).exit_code == 0
    assert run("export", "gguf", wide, "-o", plain, "--type", "q5_0", "--importance", "none").exit_code == 0
    w = T.AutoModelForCausalLM.from_pretrained(wide).state_dict()["model.layers.0.mlp.down_proj.weight"]
    imp = input_importance(open_model(wide), str(calib_text), samples=4, seq_len=32, seed=3)
    read = {f: {t.name: t for t in gguf.GGUFReader(f).tensors}["blk.0.ffn_down.weight"] for f in (weighted, plain)}
    decoded = torch.from_numpy(gguf.quants.dequantize(read[weighted].data, Q.Q5_0).copy()).reshape(w.shape)
    assert torch.equal(decoded, dequantize_legacy(quantize_legacy(w, "q5_0", imp["model.layers.0.mlp.down_proj"])))
    assert np.array_equal(np.asarray(read[plain].data).reshape(-1), gguf.quants.quantize(w.numpy(), Q.Q5_0).reshape(-1))
