"""Heat maps of a pass's records, layers by modules (SVG), with their colour ramps."""

from __future__ import annotations

from typing import Any

from sparsify.report.text import _e
from sparsify.report.views import NOT_MEASURED, _is_number, _module_of, fmt_pct, fmt_sig

# Part colours (size breakdown) and heat-map ramps: colour-blind-safe, readable on white.
PART_COLORS = {
    "embeddings": "#7a9cc6",
    "attention": "#e08a3c",
    "mlp": "#4f9a6a",
    "experts": "#9d6fb8",
    "norms": "#c9b458",
    "other": "#a3a9b4",
}


RAMP_FRACTION = ("#f4f8fd", "#c6dbef", "#6baed6", "#2171b5", "#08306b")  # sparsity, FLOPs, recall: 0 → 100%


RAMP_ERROR = ("#fff7ec", "#fdd49e", "#fc8d59", "#d7301f", "#7f0000")  # errors: 0 → the largest


BIT_COLORS = {2: "#7f0000", 3: "#d7301f", 4: "#fc8d59", 8: "#6baed6", 16: "#deebf7"}


MISSING = "#e4e6ea"


# Record keys drawn as heat maps: key -> (label, format, scale). Order = order on the page.
METRICS: dict[str, tuple[str, str, str]] = {
    "sparsity": ("sparsity", "pct", "fraction"),
    "bits": ("weight bits", "int", "bits"),
    "flops_fraction": ("attention FLOPs vs dense", "pct", "fraction"),
    "recall": ("router top-k recall", "pct", "fraction"),
    "coverage": ("activation mass routed", "pct", "fraction"),
    "rel_error": ("relative output error", "err", "error"),
    "weight_error": ("relative weight error", "err", "error"),
}


METRIC_NOTES = {
    "rel_error": "‖output − dense output‖ / ‖dense output‖ on calibration inputs; darker = more damage",
    "weight_error": "quantization error of the weights, relative; darker = more",
    "sparsity": "fraction of weights set to zero",
    "flops_fraction": "attention FLOPs of the pattern relative to dense attention",
}


def _ramp(colors: tuple[str, ...], t: float) -> str:
    t = min(max(t, 0.0), 1.0) * (len(colors) - 1)
    i = min(int(t), len(colors) - 2)
    f = t - i
    a, b = colors[i], colors[i + 1]
    rgb = [round(int(a[k : k + 2], 16) * (1 - f) + int(b[k : k + 2], 16) * f) for k in (1, 3, 5)]
    return "#" + "".join(f"{c:02x}" for c in rgb)


def _metric_text(value: float, fmt: str, digits: int = 3) -> str:
    """A heat-map value: ``digits`` significant digits (percentages: one decimal, two when more are asked)."""
    if fmt == "pct":
        return fmt_pct(value) if digits <= 3 or value in (0, 1) else f"{value:.2%}"
    if fmt == "int":
        return f"{value:g}"
    return fmt_sig(value, digits, pad=digits <= 4)


def _short_labels(modules: list[str], whole: str) -> dict[str, str]:
    """The shortest tail naming each module uniquely (``q_proj``; ``experts.3.w1``; ``attention.output.dense``)."""
    out = {}
    for m in modules:
        parts = m.split(".") if m else []
        label = whole
        for k in range(1, len(parts) + 1):
            if k < len(parts) and parts[-k].isdigit():
                continue
            label = ".".join(parts[-k:])
            if sum(1 for o in modules if o == label or o.endswith("." + label)) == 1:
                break
        out[m] = label
    return out


_SVG_FONT = 11


def _heatmap(records: list[dict[str, Any]], key: str, whole: str = "whole layer", note: str = "") -> str:
    """One heat map: rows = layers, columns = modules, colour = ``records[key]``; every cell has a title with
    the exact value (a grey cell: no record, or a record without this value). A metric with one value
    everywhere is said in a sentence instead."""
    label, fmt, scale = METRICS[key]
    cells: dict[tuple[int, str], tuple[float | None, str]] = {}
    columns: list[str] = []
    for r in records:
        module = _module_of(r)
        if module is None:
            continue
        if module not in columns:
            columns.append(module)
        value = r.get(key)
        cells[(r["layer"], module)] = (float(value) if _is_number(value) else None, str(r.get("name", "")))
    values = [v for v, _ in cells.values() if v is not None]
    if not values:
        return ""
    note = "; ".join(x for x in (METRIC_NOTES.get(key, ""), note) if x)
    unmeasured = len(cells) - len(values)
    what = "Linears" if any(columns) else "layers"
    if max(values) - min(values) <= 1e-12 * max(1.0, abs(max(values))):
        text = f"{_metric_text(values[0], fmt)} in every one of the {len(values)} {what}" + (
            f" measured ({unmeasured} not measured)" if unmeasured else ""
        )
        return f'<div class="map"><h3>{_e(label)}</h3><p class="small">{_e(text)}</p></div>'
    layers = sorted({layer for layer, _ in cells})
    names = _short_labels(columns, whole)
    lo, hi = min(values), max(values)  # the legend says the range: contrast shows where the values differ

    def color(v: float) -> str:
        if scale == "bits":
            return BIT_COLORS.get(int(v), "#888888")
        return _ramp(RAMP_FRACTION if scale == "fraction" else RAMP_ERROR, (v - lo) / (hi - lo) if hi > lo else 0.0)

    n_cols, n_rows = len(columns), len(layers)
    cw = 84 if columns == [""] else max(14, min(40, 640 // n_cols))  # 7 columns fit a phone unscaled
    rh = 22 if n_rows <= 12 else 16 if n_rows <= 40 else 10
    char = _SVG_FONT * 0.58
    longest = max(len(names[c]) for c in columns)
    vertical = longest * char > cw - 4
    top = int(longest * char + 26) if vertical else 34
    left = 56
    legend_w = min(220, max(180, n_cols * cw))
    bits = sorted({int(v) for v in values})
    grey = len(cells) < n_rows * n_cols or unmeasured > 0
    legend_end = left + (70 * len(bits) if scale == "bits" else legend_w + 14) + (90 if grey else 0)
    means = n_cols > 1 and scale != "bits"  # a bar per layer: the row's mean, to see the worst layers at a glance
    grid_end = left + n_cols * cw
    width = max(grid_end + (124 if means else 12), legend_end)
    height = top + n_rows * rh + 58
    every = 1 if rh >= 14 else 5
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}"'
        f' role="img" aria-label="{_e(label)} by layer and module" font-size="{_SVG_FONT}">',
        f'<text x="{left}" y="11" fill="#5d6678">{"" if columns == [""] else "module →"}</text>',
        f'<text transform="translate(13 {top + n_rows * rh / 2}) rotate(-90)" text-anchor="middle"'
        f' fill="#5d6678">layer →</text>',
    ]
    for j, c in enumerate(columns):
        x = left + j * cw + cw / 2
        place = (
            f'transform="translate({x + 4:.1f} {top - 5}) rotate(-90)"'
            if vertical
            else f'x="{x:.1f}" y="{top - 6}" text-anchor="middle"'
        )
        parts.append(f"<text {place}><title>{_e(c or whole)}</title>{_e(names[c])}</text>")
    for i, layer in enumerate(layers):
        y = top + i * rh
        if i % every == 0 or i == n_rows - 1:
            parts.append(f'<text x="{left - 6}" y="{y + rh / 2 + 4:.1f}" text-anchor="end">{layer}</text>')
        for j, c in enumerate(columns):
            x = left + j * cw
            v, name = cells.get((layer, c), (None, ""))
            if v is None:
                why = (
                    f"{_e(name)}: {_e(label)} {NOT_MEASURED}" if name else f"layer {layer} · {_e(c)}: not in this pass"
                )
                fill, cls = MISSING, "cell empty"
            else:
                why, fill, cls = f"{_e(name)}: {_e(label)} {_e(_metric_text(v, fmt, 6))}", color(v), "cell"
            parts.append(
                f'<rect class="{cls}" x="{x}" y="{y}" width="{cw - 1}" height="{rh - 1}" fill="{fill}">'
                f"<title>{why}</title></rect>"
            )
    if means:
        row_means = {}
        for layer in layers:
            vals = [cells[(layer, c)][0] for c in columns if cells.get((layer, c), (None,))[0] is not None]
            if vals:
                row_means[layer] = sum(vals) / len(vals)
        top_mean = max([*row_means.values(), 1e-30])
        bx, bw = grid_end + 14, 96
        parts.append(f'<text x="{bx}" y="{top - 6}" fill="#5d6678">layer mean</text>')
        for i, layer in enumerate(layers):
            if layer in row_means:
                m = row_means[layer]
                parts.append(
                    f'<rect class="mean" x="{bx}" y="{top + i * rh + 2}" width="{max(bw * m / top_mean, 1):.1f}"'
                    f' height="{rh - 5}" fill="#8a93a3"><title>layer {layer}: mean {_e(label)}'
                    f" {_e(_metric_text(m, fmt, 4))}</title></rect>"
                )
        axis = top + n_rows * rh + 11
        parts.append(f'<text x="{bx}" y="{axis}" fill="#5d6678">0</text>')
        parts.append(
            f'<text x="{bx + bw}" y="{axis}" text-anchor="end" fill="#5d6678">{_e(_metric_text(top_mean, fmt))}</text>'
        )
    ly = top + n_rows * rh + 16
    if scale == "bits":
        for k, b in enumerate(bits):
            x = left + 70 * k
            parts.append(f'<rect x="{x}" y="{ly}" width="12" height="12" fill="{BIT_COLORS.get(b, "#888888")}"/>')
            parts.append(f'<text x="{x + 16}" y="{ly + 10}">{b}-bit</text>')
    else:
        steps = 24
        for k in range(steps):
            parts.append(
                f'<rect x="{left + k * legend_w / steps:.1f}" y="{ly}" width="{legend_w / steps + 0.5:.1f}"'
                f' height="10" fill="{color(lo + k / (steps - 1) * (hi - lo))}"/>'
            )
        for t, anchor in ((0, "start"), (0.5, "middle"), (1, "end")):
            parts.append(
                f'<text x="{left + t * legend_w:.1f}" y="{ly + 24}" text-anchor="{anchor}">'
                f"{_e(_metric_text(lo + t * (hi - lo), fmt))}</text>"
            )
    if grey:
        mx = legend_end - 86
        parts.append(f'<rect x="{mx}" y="{ly}" width="12" height="10" fill="{MISSING}"/>')
        parts.append(f'<text x="{mx + 16}" y="{ly + 9}">no value</text>')
    parts.append("</svg>")
    measured = {k: v for k, (v, _) in cells.items() if v is not None}

    def where(k: tuple[int, str]) -> str:
        return f"layer {k[0]}" + (f" {names[k[1]]}" if k[1] else "")

    hi_key, lo_key = max(measured, key=measured.__getitem__), min(measured, key=measured.__getitem__)
    extremes = (
        f"highest: {where(hi_key)} ({_metric_text(measured[hi_key], fmt)}); lowest: {where(lo_key)}"
        f" ({_metric_text(measured[lo_key], fmt)})"
    )
    wide = " wide" if width > 900 else ""
    return (
        f'<div class="map{wide}" style="width:{max(width, 280 if any(columns) else 360)}px"><h3>{_e(label)}</h3>'
        f'<p class="small muted">{_e(note + ("; " if note else "") + extremes)}</p>'
        f'<div class="scroll">{"".join(parts)}</div></div>'
    )
