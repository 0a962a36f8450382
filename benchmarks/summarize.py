"""Markdown tables from bench-out/*.jsonl|json, for docs/benchmarks.md (the last row per setting wins)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import OUT

SMOLLM2_PARAMS = 134_515_008  # SmolLM2-135M, embeddings included


def quality() -> str:
    rows: dict[str, dict] = {}
    path = OUT / "quality.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        row = json.loads(line)
        compute = row.get("compute_dtype", "float32")
        key = row["setting"] + ("" if compute == "float32" else f" [{compute} compute]")
        rows[key] = row
    if not rows:
        return ""
    dense = rows.get("dense", {}).get("perplexity")
    lines = [
        "| setting | tool | perplexity | vs dense | wall time (s) |",
        "|---|---|---:|---:|---:|",
    ]
    for key, r in rows.items():
        tool = "llmcompressor 0.14" if key.startswith("lc/") else ("—" if key == "dense" else "sparsify")
        ratio = f"{r['perplexity'] / dense:.2f}×" if dense else ""
        lines.append(f"| `{key}` | {tool} | {r['perplexity']:.2f} | {ratio} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def encoder() -> str:
    path = OUT / "encoder.json"
    if not path.is_file():
        return ""
    lines = ["| method | pattern | cosine mean | cosine min | wall time (s) |", "|---|---|---:|---:|---:|"]
    for r in json.loads(path.read_text()):
        lines.append(
            f"| {r['method']} | {r['pattern']} | {r['cosine_mean']:.4f} | {r['cosine_min']:.4f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def _attention_rows(kind: str) -> dict[str, dict]:
    path = OUT / "attention.jsonl"
    rows: dict[str, dict] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        row = json.loads(line)
        if row["kind"] == kind:
            rows[row["setting"]] = row
    return rows


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def attention() -> str:
    rows = _attention_rows("quality")
    out = []
    if rows:
        dense = rows.get("dense")
        out += [
            "| setting | attention FLOPs @4096 | ppl @512 | ppl @2048 | @2048 vs dense |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, r in rows.items():
            ratio = f"{r['ppl_2048'] / dense['ppl_2048']:.2f}×" if dense else ""
            out.append(f"| `{name}` | {r['flops_fraction']:.1%} | {r['ppl_512']:.3f} | {r['ppl_2048']:.3f} | {ratio} |")
    gen = _attention_rows("generate")
    if gen:
        out += [
            "",
            "| setting | cache | tokens/s | tokens/s, last 1024 | KV cache at end (MiB) | RSS after 1k / 2k / 3k / 4k tokens (MiB) | peak RSS (MiB) |",
            "|---|---|---:|---:|---:|---|---:|",
        ]
        for name, r in gen.items():
            rss = " / ".join(_mib(x) for x in r["rss_every_1024_bytes"])
            out.append(
                f"| `{name}` | {r['cache_class']} | {r['tokens_per_s']:.1f} | {r['tail_tokens_per_s']:.1f} |"
                f" {_mib(r['cache_bytes'])} | {rss} | {_mib(r['peak_rss_bytes'])} |"
            )
    pre = _attention_rows("prefill")
    if pre:
        out += ["", "| setting | forward, 2048 tokens (s) | forward, 8192 tokens (s) |", "|---|---:|---:|"]
        for name, r in pre.items():
            out.append(f"| `{name}` | {r['seconds_2048']:.2f} | {r['seconds_8192']:.2f} |")
    enc = _attention_rows("encoder")
    if enc:
        out += ["", "| setting | attention FLOPs @512 | cosine mean | cosine min |", "|---|---:|---:|---:|"]
        for name, r in enc.items():
            out.append(f"| `{name}` | {r['flops_fraction']:.1%} | {r['cosine_mean']:.4f} | {r['cosine_min']:.4f} |")
    return "\n".join(out)


def _rows(name: str) -> dict[str, dict]:
    """The last row per setting of bench-out/NAME (several files may hold one benchmark's rows)."""
    rows: dict[str, dict] = {}
    for path in sorted(OUT.glob(name)):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            key = row["setting"] + ("" if row.get("compute_dtype", "float32") == "float32" else " [bf16 compute]")
            rows[key] = row
    return rows


def structured() -> str:
    rows = _rows("structured.jsonl")
    if not rows:
        return ""
    dense = rows["dense"]
    lines = [
        "| setting | params removed | perplexity | vs dense | checkpoint (MB) | forward 512 tok (s) | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, r in rows.items():
        removed = 1 - (r["nonzero_parameters"] or SMOLLM2_PARAMS) / SMOLLM2_PARAMS
        t = r.get("forward_512_s")
        speed = f"{r['dense_forward_512_s'] / t:.2f}×" if t and r.get("dense_forward_512_s") else "—"
        lines.append(
            f"| `{key}` | {removed:.1%} | {r['perplexity']:.2f} | {r['perplexity'] / dense['perplexity']:.2f}× |"
            f" {r['bytes'] / 1e6:.0f} | {f'{t:.3f}' if t else '—'} | {speed} |"
        )
    return "\n".join(lines)


def structured_latency() -> str:
    rows = _rows("structured-latency.jsonl")
    if not rows:
        return ""
    lines = [
        "| shape (setting) | params removed | forward 512 tok (s) | dense, same run (s) | speed-up | CPU |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for key, r in rows.items():
        lines.append(
            f"| `{key}` | {1 - r['nonzero_parameters'] / SMOLLM2_PARAMS:.1%} | {r['forward_512_s']:.3f} |"
            f" {r['dense_forward_512_s']:.3f} | {r['speedup']:.2f}× | {r['cpu']} |"
        )
    return "\n".join(lines)


def quantize() -> str:
    rows = _rows("quantize.jsonl")
    if not rows:
        return ""
    dense = rows["dense"]
    lines = [
        "| setting | tool | perplexity | vs dense | Linear bytes vs fp16 | checkpoint (MB) | wall time (s) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for key, r in rows.items():
        tool = "llmcompressor 0.14" if key.startswith("lc/") else ("—" if key == "dense" else "sparsify")
        lines.append(
            f"| `{key}` | {tool} | {r['perplexity']:.3f} | {r['perplexity'] / dense['perplexity']:.3f}× |"
            f" {r['linear_bytes_vs_fp16'] / 2 if key == 'dense' else r['linear_bytes_vs_fp16']:.3f} |"
            f" {r['bytes'] / 1e6:.0f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def moe() -> str:
    rows = _rows("moe.jsonl")
    if not rows:
        return ""
    dense = rows["dense"]
    lines = [
        "| E/k/shared/split/router | FFN active | perplexity | vs dense | router recall | conversion (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, r in rows.items():
        recall = f"{r['router_recall']:.1%}" if r.get("router_recall") is not None else "—"
        secs = f"{r['seconds']:.0f}" if r.get("seconds") else "—"
        lines.append(
            f"| `{key}` | {r['ffn_active']:.1%} | {r['perplexity']:.2f} | {r['perplexity'] / dense['perplexity']:.2f}× |"
            f" {recall} | {secs} |"
        )
    return "\n".join(lines)


def moe_speed() -> str:
    path = OUT / "moe-speed.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    rows = {(r["setting"], r["experts_implementation"]): r for r in rows if "error" not in r}
    if not rows:
        return ""
    lines = [
        "| E/k/shared | experts implementation | FFN FLOPs | FFN (ms) | dense FFN (ms) | FFN speed-up | forward (s) |"
        " dense forward (s) | forward speed-up |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (spec, impl), r in rows.items():
        lines.append(
            f"| `{spec}` | {impl} | {r['ffn_flops_fraction']:.0%} | {r['ffn_s'] * 1e3:.1f} | {r['dense_ffn_s'] * 1e3:.1f} |"
            f" {r['ffn_speedup']:.2f}× | {r['forward_s']:.3f} | {r['dense_forward_s']:.3f} | {r['forward_speedup']:.2f}× |"
        )
    return "\n".join([*lines, "", f"CPU: {next(iter(rows.values()))['cpu']}"])


def moe_oracle() -> str:
    path = OUT / "moe-oracle.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    if not rows:
        return ""
    splits = ("coactivation", "cluster", "random")
    head = " | ".join(f"{s}: oracle / router" for s in splits)
    lines = [f"| layer | FFN active | best neurons | {head} |", "|---:|---:|---:|" + "---:|" * len(splits)]
    for r in rows:
        cells = " | ".join(f"{r[f'{s}/mass_oracle']:.3f} / {r[f'{s}/analytic']:.3f}" for s in splits)
        lines.append(f"| {r['layer']} | {r['ffn_active']:.0%} | {r['neuron_oracle']:.3f} | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":
    for table in (quality, encoder, attention, structured, structured_latency, quantize, moe, moe_speed, moe_oracle):
        print(table())
        print()
