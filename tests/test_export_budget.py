"""`sparsify export gguf --target-size/--target-bpw`: a type per matrix chosen by measured damage within a byte
budget; the file is the size asked, reads back as our rounding in every type, and its predicted KL divergence tracks
the one measured."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
import transformers as T

from sparsify.data import load_text, sample_windows, tokenize
from sparsify.evaluate import load_tokenizer
from sparsify.export.budget import menu, roundtrip
from tests import zoo
from tests.test_cli import assert_user_error, run

Q = gguf.GGMLQuantizationType
_GGUF = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}  # fmt: skip


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """Two Llama layers: rows of 256 (every type) but the down projection's (320: legacy, Q8_0 and F16 only)."""
    return zoo.save_llama(tmp_path_factory.mktemp("budget"), hidden_size=256, intermediate_size=320,
                          num_hidden_layers=2, max_position_embeddings=128)  # fmt: skip


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text("\n\n".join(zoo.training_text()))
    return path


SETTINGS = ("--samples", "8", "--seq-len", "64", "--importance", "none")


@pytest.fixture(scope="module")
def export(model, calib, tmp_path_factory):
    """Factory: ``model`` exported with the flags given, once per module: ``(file, summary)``."""
    made: dict[tuple[str, ...], tuple[Path, dict]] = {}

    def get(*flags: str) -> tuple[Path, dict]:
        if flags not in made:
            out = tmp_path_factory.mktemp("gguf") / "m.gguf"
            r = run("export", "gguf", model, "-o", out, "--calib", calib, *SETTINGS, *flags, "--json")
            assert r.exit_code == 0, r.output
            made[flags] = out, json.loads(r.stdout)
        return made[flags]

    return get


def _kl(model: Path, out: Path, calib: Path) -> float:
    """The mean per-token KL divergence of the GGUF file (read by transformers) to the float model, on windows of
    the calibration text other than the ones the budget measured on (another seed)."""
    tok = load_tokenizer(model)
    ids = sample_windows(tokenize(load_text(str(calib), tokenizer=tok), tok), 16, 64, seed=1)  # (16, 64)
    src = T.AutoModelForCausalLM.from_pretrained(model).eval()
    got = T.AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    with torch.no_grad():
        p, q = src(ids).logits.log_softmax(-1), got(ids).logits.log_softmax(-1)  # (16, 64, vocab)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_the_file_is_the_size_asked_and_reads_back_as_our_rounding_in_each_type(model, export):
    out, s = export("--target-bpw", "4.2")
    size = out.stat().st_size
    assert size == s["bytes"] == s["budget"]["bytes"]  # the prediction of the file's bytes is exact
    elements = sum(int(torch.tensor(t.shape).prod()) for t in gguf.GGUFReader(out).tensors)
    header = size - sum(-(-int(t.n_bytes) // 32) * 32 for t in gguf.GGUFReader(out).tensors)
    bpw = (size - header) * 8 / elements
    assert 0.99 * 4.2 <= bpw <= 4.2
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert len({types[n] for n in s["budget"]["types"]}) > 2  # a mix, not one type
    source = T.AutoModelForCausalLM.from_pretrained(model).eval()
    loaded = T.AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    read, expected = loaded.state_dict(), {}
    for name, w in source.state_dict().items():
        if w.dim() < 2 or (name == "lm_head.weight" and source.config.tie_word_embeddings):
            continue
        parts = name.split(".")
        gname = ("output" if parts[0] == "lm_head" else "token_embd" if "embed" in name
                 else f"blk.{parts[2]}.{_GGUF[parts[-2]]}") + ".weight"  # fmt: skip
        kind = types[gname].name.lower()
        assert kind in menu(w.shape[-1]), (gname, kind)  # K types only where rows are whole super-blocks
        assert s["budget"]["types"][gname] == kind
        expected[name] = roundtrip(w, kind, None)
        assert torch.equal(read[name], expected[name]), name  # bit for bit (q/k rows permuted and back: rows alone)
    ours = T.AutoModelForCausalLM.from_pretrained(model).eval()
    ours.load_state_dict({**ours.state_dict(), **expected})
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ours(ids).logits)
    header = s["details"][0].split()  # the heat map: a row per layer, a column per matrix
    assert header == ["layer", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    assert len(s["details"]) == 4 and s["details"][-1].startswith("other: ")


def test_more_bytes_less_damage_predicted_and_measured_and_the_prediction_tracks_it(model, export, calib):
    low, high = export("--target-bpw", "3.2"), export("--target-bpw", "5.5")
    measured = [_kl(model, out, calib) for out, _ in (low, high)]
    predicted = [s["budget"]["predicted_kl"] for _, s in (low, high)]
    assert predicted[1] < predicted[0] and measured[1] < measured[0]
    for p, m in zip(predicted, measured, strict=True):
        assert m / 3 < p < m * 3, (predicted, measured)  # the Fisher's second-order prediction, not a guess


def test_a_budget_beats_one_type_at_the_same_bytes(model, export, calib):
    uniform, _ = export("--type", "q4_0")
    budget, s = export("--target-size", str(uniform.stat().st_size))
    assert s["bytes"] <= uniform.stat().st_size
    assert _kl(model, budget, calib) < _kl(model, uniform, calib)


def test_the_same_settings_write_the_same_bytes(model, export, calib, tmp_path):
    out, _ = export("--target-bpw", "3.2")
    again = tmp_path / "again.gguf"
    r = run("export", "gguf", model, "-o", again, "--calib", calib, *SETTINGS, "--target-bpw", "3.2")
    assert r.exit_code == 0, r.output
    assert again.read_bytes() == out.read_bytes()
    assert "predicted KL divergence" in r.stdout and r.stdout.splitlines()[1].startswith("layer ")


@pytest.mark.parametrize(
    "flags, fragments",
    [
        (("--target-bpw", "1"), ("--target-bpw 1 is below the smallest file", "bits per weight")),
        (("--target-size", "10GB"), ("--target-size 10GB is above the F16 file", "--type f16")),
        (("--target-size", "5XB"), ("--target-size", "'5XB' is not a size")),
        (("--target-size", "1MB", "--target-bpw", "4"), ("--target-size and --target-bpw",)),
        (("--target-bpw", "4", "--type", "q4_k"), ("--target-bpw", "--type q4_k")),
        (("--target-bpw", "0"), ("--target-bpw",)),
    ],
)
def test_a_budget_that_cannot_be_met_is_one_line_before_any_work(model, tmp_path, flags, fragments):
    out = tmp_path / "m.gguf"
    r = run("export", "gguf", model, "-o", out, *flags)
    assert_user_error(r, out, *fragments)
    assert "importance" not in r.stderr and "Fisher" not in r.stderr  # refused before measuring


def test_the_fisher_is_each_tokens_output_gradient_times_its_input_squared(model, calib):
    """The hooks' one matrix product per batch equals the definition, token by token: for a Linear
    ``sum_t (g_t x_t^T)^2 / N``; for the embedding, each token's squared output gradient on its row; ``g_t`` the
    gradient of the log-likelihood of a label drawn from the model's own prediction (the model's Fisher, seeded)."""
    from sparsify.checkpoint import open_model
    from sparsify.export.sensitivity import weight_fisher

    fisher = weight_fisher(open_model(model), str(calib), 3, 16, seed=5)
    tok = load_tokenizer(model)
    ids = sample_windows(tokenize(load_text(str(calib), tokenizer=tok), tok), 3, 16, seed=5)  # (3, 16)
    m = T.AutoModelForCausalLM.from_pretrained(model).eval().requires_grad_(False)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(name):
        def hook(_module, args, out):
            out = out.detach().requires_grad_() if name == "embed" else out
            out.retain_grad()
            seen[name] = (args[0], out)
            return out

        return hook

    m.model.embed_tokens.register_forward_hook(keep("embed"))
    m.model.layers[1].mlp.down_proj.register_forward_hook(keep("down"))
    logits = m(input_ids=ids).logits[:, :-1]  # (3, 15, vocab)
    flat = logits.reshape(-1, logits.shape[-1])  # (45, vocab)
    drawn = torch.multinomial(flat.detach().softmax(-1), 1, generator=torch.Generator().manual_seed(5))[:, 0]
    assert not torch.equal(drawn, ids[:, 1:].reshape(-1))  # not the text's next tokens
    torch.nn.functional.cross_entropy(flat, drawn, reduction="sum").backward()
    n = ids[:, 1:].numel()
    x, out = seen["down"]
    want = torch.zeros_like(m.model.layers[1].mlp.down_proj.weight)
    for b in range(3):
        for t in range(16):
            want += torch.outer(out.grad[b, t], x[b, t]).square()
    torch.testing.assert_close(fisher["model.layers.1.mlp.down_proj.weight"], want / n)
    _, emb = seen["embed"]
    rows = torch.zeros_like(m.model.embed_tokens.weight)
    for b in range(3):
        for t in range(16):
            rows[ids[b, t]] += emb.grad[b, t].square()
    assert not m.config.tie_word_embeddings  # (a tied head would add its Linear's share to the same matrix)
    torch.testing.assert_close(fisher["model.embed_tokens.weight"], rows / n)
