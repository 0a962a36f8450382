"""IQ4_NL and IQ4_XS (llama.cpp's non-linear 4-bit types): our packed blocks decoded by gguf-py equal our own decoding
bit for bit; the choice equals a block-by-block loop written from llama.cpp's ``quantize_row_iq4_nl_impl`` and beats a
naive rounding; `sparsify export gguf --type iq4_xs|iq4_nl` reads back through transformers as exactly our weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers as T
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from sparsify.algorithms.iq4 import (
    BLOCK,
    IQ4_TYPES,
    KVALUES,
    IQ4Quant,
    dequantize_iq4,
    iq4_weights,
    quantize_iq4,
)
from sparsify.algorithms.kquants import weighted_error
from sparsify.export.budget import menu, roundtrip
from sparsify.export.kquant_blocks import IQ4_TYPE_SIZE, pack_iq4
from tests import zoo
from tests.test_cli import run

TYPES = list(IQ4_TYPES)  # iq4_nl, iq4_xs
Q = GGMLQuantizationType


def _weights(seed: int, rows: int = 12, cols: int = 512) -> torch.Tensor:
    """Gaussian rows of various scales with the awkward ones: all zeros, constants of either sign, huge outliers,
    scales near fp16's subnormals, heavy tails, a zero block and a zero super-block beside live ones."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 0.05  # (rows, cols)
    w[0] = 0
    w[1] = 0.37
    w[2] = -1.5
    w[3, [5, 300]] = torch.tensor([40.0, -65.0])  # outliers ~1000x the row
    w[4] *= 1e-4  # scales near fp16's subnormals
    w[5, :256] = 0  # a zero super-block beside a live one
    w[6] = torch.randn(cols, generator=g) * 0.02 / torch.rand(cols, generator=g).clamp_min(0.02).sqrt()  # heavy
    w[7, 32:64] = 0  # a zero block (sub-block) beside live ones
    w[8, 64:96] = 0.01  # a constant block inside a live row
    return w


def _skewed_importance(cols: int, seed: int) -> torch.Tensor:
    """A diagonal of X^T X as activations give it: log-normal, a few columns hundreds of times the rest."""
    g = torch.Generator().manual_seed(seed + 1000)
    imp = torch.exp(torch.randn(cols, generator=g) * 1.5)
    imp[torch.randperm(cols, generator=g)[: cols // 16]] *= 100
    return imp


def _heavy(seed: int, rows: int = 32, cols: int = 1024) -> torch.Tensor:
    """Heavy-tailed weights (a Gaussian over the square root of a uniform), as trained matrices are."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * 0.02 / torch.rand(rows, cols, generator=g).clamp_min(0.05).sqrt()


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return (
        a.dtype == b.dtype == np.float32 and a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))
    )


# ---- packed bytes, read back by gguf-py ---------------------------------------------------------------------------


@pytest.mark.parametrize("with_imp", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", TYPES)
def test_packed_blocks_decode_to_our_weights_bit_for_bit(name, seed, with_imp):
    w = _weights(seed)
    imp = _skewed_importance(w.shape[1], seed) if with_imp else None
    iq = quantize_iq4(w, name, imp)
    assert iq.q.dtype == torch.uint8 and int(iq.q.max()) <= 15
    assert iq.d.dtype == torch.float16 and iq.d.shape == (w.shape[0], w.shape[1] // BLOCK[name])
    if name == "iq4_xs":
        assert iq.scales is not None and iq.scales.shape == (w.shape[0], w.shape[1] // 32)
        assert int(iq.scales.min()) >= -32 and int(iq.scales.max()) <= 31
    else:
        assert iq.scales is None

    data = pack_iq4(iq)
    block, size = GGML_QUANT_SIZES[Q[name.upper()]]
    assert (block, size) == (BLOCK[name], IQ4_TYPE_SIZE[name])
    assert data.shape == (w.shape[0], w.shape[1] // block * size) and data.dtype == np.uint8

    theirs = gguf_dequantize(data, Q[name.upper()])  # (rows, cols) float32, gguf-py's reading of ggml's layout
    ours = dequantize_iq4(iq).numpy()
    assert _same_bits(theirs, ours)  # bit for bit, signed zeros included
    assert not ours[0].any() and not ours[5, :256].any() and not ours[7, 32:64].any()  # zeros stay zeros
    assert np.abs(ours[1] - 0.37).max() <= 0.37 * 2**-11  # constants stay constant, up to fp16's rounding of d
    assert np.abs(ours[2] + 1.5).max() <= 1.5 * 2**-11
    block = ours[8, 64:96]  # a constant block inside a live row: one value, near it
    assert np.ptp(block) == 0 and abs(block[0] - 0.01) <= (0.01 * 2**-11 if name == "iq4_nl" else 0.05 * 0.01)
    assert (np.abs(ours[3, [5, 300]] - [40.0, -65.0]) < [0.03 * 40, 0.03 * 65]).all()  # outliers survive


def test_every_bit_position_is_read_where_we_write_it():
    """Indices and IQ4_XS's sub-block scales set one at a time to an extreme land on exactly that weight (that
    sub-block) in gguf-py's reading (a transposed nibble or a shifted bit would move it)."""
    rows, cols = 1, 512
    for name in TYPES:
        d = torch.full((rows, cols // BLOCK[name]), 0.5, dtype=torch.float16)
        scales = torch.ones(rows, cols // 32, dtype=torch.int8) if name == "iq4_xs" else None
        for j in range(0, cols, 5):
            q = torch.full((rows, cols), 8, dtype=torch.uint8)
            q[0, j] = 15 if j % 2 else 0
            iq = IQ4Quant(name, q, d, scales)
            assert _same_bits(gguf_dequantize(pack_iq4(iq), Q[name.upper()]), dequantize_iq4(iq).numpy())
        if name == "iq4_xs":
            for s in range(cols // 32):
                for value in (-32, 31, 17, -1):
                    sc = torch.zeros(rows, cols // 32, dtype=torch.int8)
                    sc[0, s] = value
                    iq = IQ4Quant(name, torch.full((rows, cols), 15, dtype=torch.uint8), d, sc)
                    theirs = gguf_dequantize(pack_iq4(iq), Q[name.upper()])
                    assert _same_bits(theirs, dequantize_iq4(iq).numpy())
                    assert np.count_nonzero(theirs) == 32 and theirs[0, 32 * s] == 0.5 * value * 113


def test_rejects_what_it_cannot_quantize():
    w = torch.randn(2, 512)
    with pytest.raises(ValueError, match=r"IQ4_XS takes a weight .* multiple of 256"):
        quantize_iq4(torch.randn(2, 288), "iq4_xs")
    with pytest.raises(ValueError, match=r"IQ4_NL takes a weight .* multiple of 32"):
        quantize_iq4(torch.randn(2, 48), "iq4_nl")
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_iq4(torch.randn(64), "iq4_nl")
    with pytest.raises(ValueError, match="unknown IQ4 type"):
        quantize_iq4(w, "iq4_ks")
    with pytest.raises(ValueError, match="one value per column"):
        quantize_iq4(w, "iq4_xs", torch.ones(256))
    with pytest.raises(ValueError, match="non-negative"):
        quantize_iq4(w, "iq4_nl", -torch.ones(512))
    with pytest.raises(ValueError, match="all zeros"):
        quantize_iq4(w, "iq4_nl", torch.zeros(512))
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_iq4(torch.full((2, 512), float("nan")), "iq4_xs")
    with pytest.raises(ValueError, match="overflows fp16"):
        quantize_iq4(w * 1e9, "iq4_nl")
    iq = quantize_iq4(w, "iq4_xs")
    assert iq.scales is not None
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 15\]"):
        pack_iq4(IQ4Quant("iq4_xs", iq.q + 16, iq.d, iq.scales))  # a 16 would spill into the next nibble
    with pytest.raises(ValueError, match=r"scales must lie in \[-32, 31\]"):
        pack_iq4(IQ4Quant("iq4_xs", iq.q, iq.d, iq.scales.clamp(max=0) - 1))
    with pytest.raises(ValueError, match="needs sub-block scales"):
        pack_iq4(IQ4Quant("iq4_xs", iq.q, iq.d, None))


# ---- what the choice achieves ---------------------------------------------------------------------------------------


def _naive(w: torch.Tensor, name: str) -> torch.Tensor:
    """Round to nearest: per block of 32 ``d = max / 127`` (``max`` the value of largest magnitude, signed, fp16);
    IQ4_XS's sub-block scales rounded against ``d_largest / -32`` (fp16); each weight the level nearest ``x / d``."""
    levels = torch.tensor(KVALUES, dtype=torch.float64)
    x = w.double().reshape(w.shape[0], -1, 32)  # (rows, blocks, 32)
    d = x.gather(-1, x.abs().argmax(-1, keepdim=True)) / 127  # (rows, blocks, 1)
    fp16 = lambda t: t.half().double()  # noqa: E731
    if name == "iq4_xs":
        sub = d.reshape(w.shape[0], -1, 8)  # (rows, super-blocks, 8)
        top = fp16(sub.gather(-1, sub.abs().argmax(-1, keepdim=True)) / -32)  # (rows, super-blocks, 1)
        ls = torch.where(top != 0, (sub / torch.where(top != 0, top, 1.0)).round().clamp(-32, 31), 0.0)
        d = (top * ls).reshape(d.shape)
    else:
        d = fp16(d)
    y = x / torch.where(d != 0, d, 1.0)
    return (d * levels[(y[..., None] - levels).abs().argmin(-1)]).reshape(w.shape).float()


def _llama_error(w: torch.Tensor, w_hat: torch.Tensor, name: str, imp: torch.Tensor | None) -> torch.Tensor:
    """The weighted error llama.cpp's choice minimises, per block of 32: ``(rows, cols // 32)`` float64."""
    v = iq4_weights(w, name, imp)
    e = v * (w.double() - w_hat.double()).square()
    return e.reshape(w.shape[0], -1, 32).sum(-1)


@pytest.mark.parametrize("with_imp", [False, True])
@pytest.mark.parametrize("name", TYPES)
def test_never_worse_than_a_naive_rounding(name, with_imp):
    """On llama.cpp's weighted error (the objective) and on the importance-weighted proxy of the output error,
    Gaussian and heavy-tailed weights: IQ4_NL's blocks each at least as good (up to fp16's rounding of the
    scales); whole matrices far better (measured: 0.13-0.33 of the naive error on the objective, 0.25-0.69 on the
    proxy)."""
    g = torch.Generator().manual_seed(11)
    for w in (torch.randn(32, 1024, generator=g) * 0.02, _heavy(12)):
        imp = _skewed_importance(w.shape[1], 13) if with_imp else None
        ours, naive = dequantize_iq4(quantize_iq4(w, name, imp)), _naive(w, name)
        mine, theirs = _llama_error(w, ours, name, imp), _llama_error(w, naive, name, imp)
        assert float(mine.sum()) < 0.5 * float(theirs.sum()), (name, float(mine.sum() / theirs.sum()))
        if name == "iq4_nl":
            assert bool((mine <= theirs * (1 + 1e-3)).all())
        proxy = _skewed_importance(w.shape[1], 13)
        assert weighted_error(w, ours, proxy) < 0.8 * weighted_error(w, naive, proxy)


@pytest.mark.parametrize("name", TYPES)
def test_importance_lowers_the_importance_weighted_error(name):
    w = _heavy(3)
    imp = _skewed_importance(w.shape[1], 3)
    plain = weighted_error(w, dequantize_iq4(quantize_iq4(w, name)), imp)
    weighted = weighted_error(w, dequantize_iq4(quantize_iq4(w, name, imp)), imp)
    assert weighted < 0.6 * plain, (name, weighted / plain)


@pytest.mark.parametrize("name", TYPES)
def test_a_block_of_silent_columns_is_still_fitted_and_the_choice_is_deterministic(name):
    w = _heavy(6)[:4]
    imp = _skewed_importance(w.shape[1], 6)
    imp[:256] = 0  # the first super-block's inputs never fired in calibration
    iq = quantize_iq4(w, name, imp)
    got = dequantize_iq4(iq)
    rel = (got[:, :256] - w[:, :256]).norm() / w[:, :256].norm()
    assert rel < 0.3, (name, float(rel))  # fitted, not written as zeros (1.0)
    again = quantize_iq4(w.clone(), name, imp.clone())
    assert torch.equal(again.q, iq.q) and torch.equal(again.d, iq.d)


# ---- the vectorised choice against a block-by-block loop --------------------------------------------------------------
# Plain Python floats (float64), one block at a time, written from llama.cpp's quantize_row_iq4_nl_impl with our tie
# rule, the codes chosen again for the fp16 scales and IQ4_XS's sub-block scale the best of its rounding and neighbours.

_TIE = 1e-12


def _best_index(y: float) -> int:  # ggml's best_index_int8: the nearest level, ties to the upper one
    if y <= KVALUES[0]:
        return 0
    if y >= KVALUES[-1]:
        return 15
    lo, hi = 0, 15
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if y < KVALUES[mid]:
            hi = mid
        else:
            lo = mid
    return hi - 1 if y - KVALUES[hi - 1] < KVALUES[hi] - y else hi


def _loop_scale(x: list[float], v: list[float]) -> float:
    k = max(range(len(x)), key=lambda j: (abs(x[j]), -j))  # the first of largest magnitude
    mx = x[k]
    if abs(mx) < 1e-15:
        return 0.0

    def fit(isc: float) -> tuple[float, float]:
        qs = [KVALUES[_best_index(isc * a)] for a in x]
        sqx = sum(c * q * a for c, q, a in zip(v, qs, x, strict=True))
        sq2 = sum(c * q * q for c, q in zip(v, qs, strict=True))
        return (sqx / sq2, sqx * sqx / sq2) if sq2 > 0 else (0.0, 0.0)

    d, best = fit(127 / mx)
    for i in range(-7, 8):
        s, g = fit((i - 127) / mx)
        if g > (1 + _TIE) * best:
            d, best = s, g
    return d


def _loop_row(x: list[float], imp: list[float] | None, name: str):
    """``(codes, d, scales)`` of one row: codes a list of indices, ``d`` per (super-)block, IQ4_XS's scales."""
    block = 32 if name == "iq4_nl" else 256
    mean = None if imp is None else sum(imp) / len(imp)
    codes, ds, ls = [], [], []
    for b in range(0, len(x), block):
        xb = x[b : b + block]
        s2 = 2 * sum(a * a for a in xb) / block
        if imp is None:
            v = [a * a for a in xb]
        else:
            assert mean is not None
            v = [max(c, 1e-6 * mean) * math.sqrt(s2 + a * a) for c, a in zip(imp[b : b + block], xb, strict=True)]
        scales = [_loop_scale(xb[k : k + 32], v[k : k + 32]) for k in range(0, block, 32)]
        if name == "iq4_nl":
            d = float(np.float16(scales[0]))
            ds.append(d)
            codes += [_best_index(a / d) if d else 8 for a in xb]
            continue
        top = scales[max(range(8), key=lambda k: (abs(scales[k]), -k))]
        d = float(np.float16(-top / 32 + 0.0))
        ds.append(d)
        for k in range(8):
            xs, vs = xb[32 * k : 32 * k + 32], v[32 * k : 32 * k + 32]
            tol = _TIE * sum(c * a * a for c, a in zip(vs, xs, strict=True))
            first = min(max(round(scales[k] / d), -32), 31) if d else 0
            best = None
            for lc in (first, max(first - 1, -32), min(first + 1, 31)):
                dl = d * lc
                qs = [_best_index(a / dl) if dl else 8 for a in xs]
                e = sum(c * (a - dl * KVALUES[q]) ** 2 for c, a, q in zip(vs, xs, qs, strict=True))
                if best is None or e < best[0] - tol:
                    best = (e, lc, qs)
            assert best is not None
            ls.append(best[1])
            codes += best[2]
    return codes, ds, ls


@pytest.mark.parametrize("with_imp", [False, True])
@pytest.mark.parametrize("name", TYPES)
def test_vectorised_choice_equals_a_block_by_block_loop(name, with_imp):
    w = _weights(7, rows=9, cols=512)[[3, 2, 6, 7, 8]]  # outliers, a constant, heavy, a zero block, a constant one
    imp = _skewed_importance(512, 7) if with_imp else None
    iq = quantize_iq4(w, name, imp)
    for r in range(w.shape[0]):
        x = [float(a) for a in w[r].to(torch.float64)]
        codes, ds, ls = _loop_row(x, None if imp is None else [float(a) for a in imp.to(torch.float64)], name)
        assert iq.q[r].tolist() == codes, (name, r)
        assert [float(a) for a in iq.d[r]] == ds, (name, r)
        if name == "iq4_xs":
            assert iq.scales is not None and iq.scales[r].tolist() == ls, (name, r)


# ---- the budget's menu ----------------------------------------------------------------------------------------------


def test_the_budget_offers_iq4_where_llama_cpp_runs_it_and_rounds_as_the_file():
    assert {"iq4_nl", "iq4_xs"} <= set(menu(512))
    assert "iq4_nl" in menu(320) and "iq4_xs" not in menu(320)
    assert not {"iq4_nl", "iq4_xs"} & set(menu(40))
    w, imp = _heavy(8, rows=4, cols=512), _skewed_importance(512, 8)
    for name in TYPES:
        assert torch.equal(roundtrip(w, name, imp), dequantize_iq4(quantize_iq4(w, name, imp)))


# ---- sparsify export gguf --type iq4_xs|iq4_nl --------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """A 1-layer Llama whose rows are whole super-blocks of 256 but the MLP's down projection's (320: whole
    blocks of 32 only), with untied embeddings."""
    return zoo.save_llama(tmp_path_factory.mktemp("wide"), hidden_size=256, intermediate_size=320,
                          num_hidden_layers=1, max_position_embeddings=128)  # fmt: skip


_GGUF = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}  # fmt: skip


def _expected(w: torch.Tensor, qtype) -> torch.Tensor:
    """What a weight written in ``qtype`` (unweighted) decodes to: ours for IQ4 and Q6_K, gguf-py's for Q8_0."""
    from sparsify.algorithms.kquants import dequantize_k, quantize_k

    if qtype.name.startswith("IQ4"):
        return dequantize_iq4(quantize_iq4(w, qtype.name.lower()))
    assert qtype == Q.Q6_K, qtype
    return dequantize_k(quantize_k(w, "q6_k"))


@pytest.mark.parametrize("name", TYPES)
def test_iq4_files_read_back_in_transformers_as_our_weights(wide, tmp_path, name):
    out = tmp_path / "m.gguf"
    r = run("export", "gguf", wide, "-o", out, "--type", name, "--importance", "none", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.0.ffn_gate.weight"] == Q[name.upper()]
    assert types["blk.0.ffn_down.weight"] == Q.IQ4_NL  # rows of 320: llama-quantize's fallback for IQ4_XS
    assert types["output.weight"] == types["token_embd.weight"] == Q.Q6_K  # more bits, as for the K types
    field = reader.fields["general.file_type"]
    assert int(field.parts[field.data[0]][0]) == gguf.LlamaFileType[f"MOSTLY_{name.upper()}"]
    fallback = [n for n in summary["notes"] if "llama-quantize's fallback" in n]
    if name == "iq4_xs":
        assert fallback and "1 tensors not in IQ4_XS (1 IQ4_NL, llama-quantize's fallback): rows of 320" in fallback[0]
    else:
        assert not fallback, summary["notes"]

    source = T.AutoModelForCausalLM.from_pretrained(wide).eval()
    loaded = T.AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    read, expected = loaded.state_dict(), {}
    for key, w in source.state_dict().items():
        if w.dim() < 2:
            continue
        gname = ("output" if key == "lm_head.weight" else "token_embd" if "embed" in key
                 else f"blk.0.{_GGUF[key.split('.')[-2]]}") + ".weight"  # fmt: skip
        expected[key] = _expected(w, types[gname])
        assert torch.equal(read[key], expected[key]), key  # bit for bit (q/k rows permuted and back: rows alone)
    ours = T.AutoModelForCausalLM.from_pretrained(wide).eval()
    ours.load_state_dict({**ours.state_dict(), **expected})
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        got, want, dense = loaded(ids).logits, ours(ids).logits, source(ids).logits
    assert torch.equal(got, want)
    assert float((got - dense).norm() / dense.norm()) < 0.2  # 4-bit: near the float model's (0.13 measured)
    p, q = dense.log_softmax(-1), got.log_softmax(-1)
    assert float((p.exp() * (p - q)).sum(-1).mean()) < 2e-3  # KL divergence per token (8e-4 measured, Q4_0 9e-4)


def test_iq4_tensors_are_fitted_to_the_calibration_importance(wide, tmp_path):
    from sparsify.checkpoint import open_model
    from sparsify.export.importance import input_importance

    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(zoo.training_text()))
    out = tmp_path / "m.gguf"
    args = ["--calib", calib, "--samples", "4", "--seq-len", "32", "--seed", "3"]
    r = run("export", "gguf", wide, "-o", out, "--type", "iq4_xs", *args)
    assert r.exit_code == 0, r.output
    imp = input_importance(open_model(wide), str(calib), samples=4, seq_len=32, seed=3)
    state = T.AutoModelForCausalLM.from_pretrained(wide).state_dict()
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    for key, gname, qtype in (("gate_proj", "ffn_gate", Q.IQ4_XS), ("down_proj", "ffn_down", Q.IQ4_NL)):
        w = state[f"model.layers.0.mlp.{key}.weight"]
        decoded = torch.from_numpy(gguf_dequantize(tensors[f"blk.0.{gname}.weight"].data, qtype).copy())
        fitted = dequantize_iq4(quantize_iq4(w, qtype.name.lower(), imp[f"model.layers.0.mlp.{key}"]))
        assert torch.equal(decoded.reshape(w.shape), fitted), gname
        assert not torch.equal(fitted, dequantize_iq4(quantize_iq4(w, qtype.name.lower())))
