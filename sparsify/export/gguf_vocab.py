"""The tokenizer as llama.cpp reads it from GGUF: its model, pre-tokenizer, tokens, types, merges, special ids.

Two kinds of Hugging Face fast tokenizer map onto llama.cpp's: byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM:
``tokenizer.ggml.model = "gpt2"``, merges, a named pre-tokenizer) and SentencePiece-style BPE with byte
fallback (Llama 2, Mistral v0.1, Gemma: ``"llama"``, scores, no pre-tokenizer; gguf's own ``LlamaHfVocab``
reads it). llama.cpp knows each byte-level pre-tokenizer by name, not by its regex: the names of the ones
recognised here are in :data:`PRE_TOKENIZERS`; any other is refused, as llama.cpp's converter refuses it
(a wrong split changes every token id).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsify.errors import SparsifyError

_GPT2 = "ByteLevel+regex"  # the GPT-2 split that ByteLevel(use_regex=True) applies
_LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# the pre-tokenizer chain of tokenizer.json (see _signature) -> llama.cpp's name for it
PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    (_GPT2,): "gpt-2",
    (f"Split:{_LLAMA3}", "ByteLevel"): "llama-bpe",
    (f"Split:{_QWEN2}", "ByteLevel"): "qwen2",
    ("Digits:individual", _GPT2): "smollm",
}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4  # gguf.TokenType values


@dataclass
class Vocab:
    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style)
    pre: str | None  # llama.cpp's pre-tokenizer name (byte-level BPE only)
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None  # SentencePiece-style only
    special: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad -> id
    add_bos: bool = False
    add_eos: bool = False


def read_vocab(folder: Path, vocab_size: int) -> Vocab:
    """The tokenizer of ``folder`` padded to the model's ``vocab_size`` rows (as llama.cpp's converter pads)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise SparsifyError(f"{folder} has no tokenizer.json: GGUF carries the tokenizer, and only fast tokenizers map")
    data = json.loads(path.read_text())
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise SparsifyError(f"the tokenizer is {model.get('type')}: llama.cpp's GGUF takes BPE tokenizers here")
    tok = _hf_tokenizer(folder)
    vocab = _spm_vocab(folder, vocab_size) if model.get("byte_fallback") else _bpe_vocab(data, tok, vocab_size)
    vocab.special = _special_ids(tok)
    vocab.add_bos, vocab.add_eos = _adds_specials(tok)
    return vocab


def _hf_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise SparsifyError(f"cannot load the tokenizer in {folder}: {e}") from e


def _signature(pre: dict[str, Any] | None) -> tuple[str, ...]:
    """The pre-tokenizer chain as comparable strings (``Split:<regex>``, ``ByteLevel+regex``, ...)."""
    if not pre:
        return ()
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    out = []
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            out.append(_GPT2 if step.get("use_regex", True) else "ByteLevel")
        elif kind == "Split":
            out.append(f"Split:{(step.get('pattern') or {}).get('Regex', (step.get('pattern') or {}).get('String'))}")
        elif kind == "Digits":
            out.append("Digits:individual" if step.get("individual_digits") else "Digits")
        else:
            out.append(str(kind))
    return tuple(out)


def _bpe_vocab(data: dict[str, Any], tok, vocab_size: int) -> Vocab:
    """Byte-level BPE, token by token as llama.cpp's converter lists them: added tokens typed control (special)
    or user-defined, ids the tokenizer lacks as ``[PAD<id>]``."""
    signature = _signature(data.get("pre_tokenizer"))
    pre = PRE_TOKENIZERS.get(signature)
    if pre is None:
        raise SparsifyError(
            f"the tokenizer's pre-tokenizer ({' + '.join(signature) or 'none'}) is not one llama.cpp knows by name"
            f" here ({', '.join(sorted(PRE_TOKENIZERS.values()))}); its text would split differently"
        )
    by_id = {i: t for t, i in tok.get_vocab().items()}
    added = {i: a for i, a in tok.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_USER_DEFINED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(TOKEN_CONTROL if added[i].special else TOKEN_USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TOKEN_NORMAL)
    return Vocab("gpt2", pre, tokens, types)


def _spm_vocab(folder: Path, vocab_size: int) -> Vocab:
    """SentencePiece-style BPE with byte fallback, read by gguf's own ``LlamaHfVocab`` (scores and types)."""
    from gguf.vocab import LlamaHfVocab

    try:
        hf = LlamaHfVocab(folder)
    except (FileNotFoundError, TypeError) as e:
        raise SparsifyError(f"cannot read the SentencePiece-style tokenizer in {folder}: {e}") from e
    tokens, scores, types = [], [], []
    for text, score, kind in hf.all_tokens():
        tokens.append(text.decode("utf-8"))
        scores.append(float(score))
        types.append(int(kind))
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(TOKEN_USER_DEFINED)
    return Vocab("llama", None, tokens[:vocab_size], types[:vocab_size], scores[:vocab_size])


def _special_ids(tok) -> dict[str, int]:
    out = {}
    for name in ("bos", "eos", "unk", "pad"):
        i = getattr(tok, f"{name}_token_id", None)
        if isinstance(i, int):
            out[name] = i
    return out


def _adds_specials(tok) -> tuple[bool, bool]:
    """Whether the tokenizer puts BOS before and EOS after a text, as it behaves (not as a flag says)."""
    ids = tok("a")["input_ids"]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    return bool(ids) and bos is not None and ids[0] == bos, bool(ids) and eos is not None and ids[-1] == eos


def merges(folder: Path) -> list[str]:
    """The BPE merges of ``tokenizer.json`` as llama.cpp reads them ("a b" lines), through gguf's SpecialVocab."""
    from gguf import SpecialVocab

    return list(SpecialVocab(folder, load_merges=True).merges)


def chat_template(folder: Path) -> str | None:
    from gguf import SpecialVocab

    template = SpecialVocab(folder, load_merges=False).chat_template
    return template if isinstance(template, str) else None
