"""Markdown tables from bench-out/*.jsonl|json, for docs/benchmarks.md (the last row per setting wins)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import OUT


def quality() -> str:
    rows: dict[str, dict] = {}
    for line in (OUT / "quality.jsonl").read_text().splitlines():
        row = json.loads(line)
        compute = row.get("compute_dtype", "float32")
        key = row["setting"] + ("" if compute == "float32" else f" [{compute} compute]")
        rows[key] = row
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


if __name__ == "__main__":
    print(quality())
    print()
    print(encoder())
