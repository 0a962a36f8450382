"""Perplexity with llama-perplexity's protocol, through sparsify.load (transformers' arithmetic): chunks of
512 tokens, BOS in front when the tokenizer adds one, negative log-likelihood over the second half of each chunk.

    python benchmarks/llamacpp_protocol_ppl.py TEXT CHUNKS FOLDER [FOLDER ...]

Beside ``benchmarks/llamacpp_perplexity.sh FILE.gguf ...`` (llama.cpp's own ``llama-perplexity``, same text,
``-c 512 --chunks 64``), so a GGUF file and the folder it was exported from are scored the same way.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

import sparsify
from sparsify.evaluate import load_tokenizer


def ppl(folder: str, text: Path, chunks: int, n_ctx: int = 512) -> float:
    tok = load_tokenizer(Path(folder))
    ids = tok(text.read_text(), add_special_tokens=True)["input_ids"]
    stream = torch.tensor(ids)
    bos_added = tok.bos_token_id is not None and ids[:1] == [tok.bos_token_id]
    model = sparsify.load(folder, kernel="reference", dtype=torch.float32).eval()
    nll, count = 0.0, 0
    n = min(chunks, stream.numel() // n_ctx)
    with torch.no_grad():
        for i in range(n):
            t = stream[i * n_ctx : (i + 1) * n_ctx].clone()
            if bos_added:
                t[0] = tok.bos_token_id
            logits = model(input_ids=t[None]).logits[0].double()  # (n_ctx, vocab)
            first = n_ctx // 2
            lp = torch.log_softmax(logits[first : n_ctx - 1], -1)  # (n_ctx/2 - 1, vocab)
            nll -= float(lp.gather(1, t[first + 1 : n_ctx, None]).sum())
            count += n_ctx - 1 - first
    return math.exp(nll / count)


if __name__ == "__main__":
    text, chunks, *folders = sys.argv[1:]
    for f in folders:
        row = {"folder": f, "text": text, "chunks": int(chunks), "ppl": ppl(f, Path(text), int(chunks))}
        print(json.dumps(row), flush=True)
