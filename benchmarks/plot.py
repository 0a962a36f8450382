"""Bytes against quality, one line per tool, as a small self-contained SVG (no plotting library needed).

    python benchmarks/plot.py docs/data/gguf-budget.csv docs/report/gguf-budget.svg --y kl --log-y \\
        --title "SmolLM2-135M GGUF: KL to F16 vs file size (llama-perplexity, held-out Wikipedia)"

The CSV has a ``tool`` column (one line per tool), ``bytes`` and the ``--y`` column; rows are the measurements the
benchmark scripts print (docs/benchmarks.md holds the same numbers in its tables).
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

W, H, LEFT, RIGHT, TOP, BOTTOM = 720, 420, 70, 250, 40, 50
COLORS = ("#d7301f", "#2166ac", "#1b7837", "#762a83", "#e08214", "#4d4d4d")


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    if log:
        return [10.0**e * m for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
                for m in (1, 2, 5) if lo <= 10.0**e * m <= hi]  # fmt: skip
    step = 10 ** math.floor(math.log10((hi - lo) / 4 or 1))
    step *= next(k for k in (1, 2, 5, 10) if (hi - lo) / (step * k) <= 6)
    return [step * i for i in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def svg(rows: list[dict[str, str]], y: str, log_y: bool, title: str, xlabel: str, ylabel: str) -> str:
    series: dict[str, list[tuple[float, float, str]]] = {}
    for r in rows:
        series.setdefault(r["tool"], []).append((float(r["bytes"]) / 1e6, float(r[y]), r.get("file", "")))
    xs = [p[0] for s in series.values() for p in s]
    ys = [p[1] for s in series.values() for p in s]
    x0, x1 = min(xs), max(xs)
    x0, x1 = x0 - 0.05 * (x1 - x0 or 1), x1 + 0.05 * (x1 - x0 or 1)
    f = math.log10 if log_y else (lambda v: v)
    y0, y1 = f(min(ys)), f(max(ys))
    y0, y1 = y0 - 0.08 * (y1 - y0 or 1), y1 + 0.08 * (y1 - y0 or 1)

    def px(v: float) -> float:
        return LEFT + (v - x0) / (x1 - x0) * (W - LEFT - RIGHT)

    def py(v: float) -> float:
        return H - BOTTOM - (f(v) - y0) / (y1 - y0) * (H - TOP - BOTTOM)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{LEFT}" y="20" font-size="13" font-weight="bold">{title}</text>',
        f'<line x1="{LEFT}" y1="{H - BOTTOM}" x2="{W - RIGHT}" y2="{H - BOTTOM}" stroke="#333"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{H - BOTTOM}" stroke="#333"/>',
        f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 12}" text-anchor="middle">{xlabel}</text>',
        f'<text x="16" y="{(TOP + H - BOTTOM) / 2}" text-anchor="middle" '
        f'transform="rotate(-90 16 {(TOP + H - BOTTOM) / 2})">{ylabel}</text>',
    ]
    lo_y, hi_y = (10**y0, 10**y1) if log_y else (y0, y1)
    for t in _ticks(lo_y, hi_y, log_y):
        out.append(f'<line x1="{LEFT - 4}" y1="{py(t):.1f}" x2="{W - RIGHT}" y2="{py(t):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{LEFT - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    for t in _ticks(x0, x1, False):
        out.append(f'<line x1="{px(t):.1f}" y1="{H - BOTTOM}" x2="{px(t):.1f}" y2="{H - BOTTOM + 4}" stroke="#333"/>')
        out.append(f'<text x="{px(t):.1f}" y="{H - BOTTOM + 16}" text-anchor="middle">{t:g}</text>')
    for k, (name, points) in enumerate(series.items()):
        color = COLORS[k % len(COLORS)]
        points = sorted(points)
        if len(points) > 1:
            path = " ".join(f"{px(x):.1f},{py(v):.1f}" for x, v, _ in points)
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for x, v, label in points:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(v):.1f}" r="4" fill="{color}"><title>{name} {label}:'
                       f" {x:.2f} MB, {v:g}</title></circle>")  # fmt: skip
            if label and " " not in label:  # a short name (Q4_K_M) beside its point
                out.append(f'<text x="{px(x) + 6:.1f}" y="{py(v) - 6:.1f}" fill="{color}">{label}</text>')
        ly = TOP + 10 + 18 * k
        out.append(f'<rect x="{W - RIGHT + 12}" y="{ly - 8}" width="12" height="4" fill="{color}"/>')
        out.append(f'<text x="{W - RIGHT + 30}" y="{ly - 2}">{name}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--y", default="kl")
    ap.add_argument("--log-y", action="store_true")
    ap.add_argument("--title", default="")
    ap.add_argument("--xlabel", default="file size (MB, 10^6 bytes)")
    ap.add_argument("--ylabel", default=None)
    args = ap.parse_args()
    with args.csv.open() as f:
        rows = list(csv.DictReader(f))
    args.out.write_text(svg(rows, args.y, args.log_y, args.title, args.xlabel, args.ylabel or args.y))


if __name__ == "__main__":
    main()
