"""The tokenizer as llama.cpp reads it from GGUF: its model, pre-tokenizer, tokens, types, merges, special ids.

Two kinds of Hugging Face fast tokenizer map onto llama.cpp's: byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM:
``tokenizer.ggml.model = "gpt2"``, merges, a named pre-tokenizer) and SentencePiece-style BPE with byte
fallback (Llama 2, Mistral v0.1, Gemma: ``"llama"``, scores from the merge ranks, no pre-tokenizer). llama.cpp knows each byte-level pre-tokenizer by name, not by its regex: the names of the ones
recognised here are in :data:`PRE_TOKENIZERS`; any other is refused, as llama.cpp's converter refuses it
(a wrong split changes every token id).
"""

from __future__ import annotations

import json
import re
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
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_BYTE = 1, 2, 3, 4, 6  # gguf.TokenType


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
    space_prefix: bool | None = None  # SentencePiece-style: "▁" put before the text (None: not said)
    notes: list[str] = field(default_factory=list)


def read_vocab(folder: Path, vocab_size: int) -> Vocab:
    """The tokenizer of ``folder`` padded to the model's ``vocab_size`` rows (as llama.cpp's converter pads)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise SparsifyError(f"{folder} has no tokenizer.json: GGUF carries the tokenizer, and only fast tokenizers map")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SparsifyError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise SparsifyError(f"{path} is not a JSON object (a tokenizer.json holds one)")
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    if model.get("type") != "BPE":
        raise SparsifyError(f"the tokenizer is {model.get('type')}: llama.cpp's GGUF takes BPE tokenizers here")
    tok = _hf_tokenizer(folder)
    beyond = {t: i for t, i in tok.get_vocab().items() if i >= vocab_size}
    if any(i not in tok.added_tokens_decoder for i in beyond.values()):
        raise SparsifyError(
            f"the tokenizer has ids up to {max(beyond.values())}, beyond the model's vocab_size {vocab_size}"
        )
    vocab = (_spm_vocab if model.get("byte_fallback") else _bpe_vocab)(data, tok, vocab_size)
    if beyond:  # added tokens the model has no embedding rows for (a tokenizer class's own extras)
        vocab.notes.append(f"tokens past the model's vocab_size {vocab_size} not written: {', '.join(beyond)}")
    vocab.special = {k: i for k, i in _special_ids(tok).items() if i < vocab_size}
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


def _spm_vocab(data: dict[str, Any], tok, vocab_size: int) -> Vocab:
    """SentencePiece-style BPE with byte fallback, as a SentencePiece model llama.cpp merges by score: a token's
    score is minus the rank of the merge that makes it (earlier merges first, as the BPE applies them), byte
    tokens ``<0xNN>`` typed byte, the unknown token unknown, other added specials control."""
    rank: dict[str, int] = {}
    for i, merge in enumerate(data["model"].get("merges") or []):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(a + b, i)
    by_id = {i: t for t, i in tok.get_vocab().items()}
    added = dict(tok.added_tokens_decoder.items())
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        text = by_id.get(i)
        tokens.append(text if text is not None else f"[PAD{i}]")
        scores.append(-float(rank.get(text, 0)) if text is not None else -1000.0)
        if text is None:
            types.append(TOKEN_USER_DEFINED)
        elif i == tok.unk_token_id:
            types.append(TOKEN_UNKNOWN)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            types.append(TOKEN_BYTE)
        elif i in added:
            types.append(TOKEN_CONTROL if added[i].special else TOKEN_USER_DEFINED)
        else:
            types.append(TOKEN_NORMAL)
    return Vocab("llama", None, tokens, types, scores, space_prefix=_space_prefix(data))


def _space_prefix(data: dict[str, Any]) -> bool:
    """Whether the tokenizer puts "▁" before a text (a Prepend normalizer, or a Metaspace that prepends)."""
    steps = []
    for part in (data.get("normalizer"), data.get("pre_tokenizer")):
        if part:
            steps += part.get("normalizers") or part.get("pretokenizers") or [part]
    return any(
        (st.get("type") == "Prepend" and st.get("prepend") == "\u2581")
        or (st.get("type") == "Metaspace" and st.get("prepend_scheme", "always") != "never")
        for st in steps
    )


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
