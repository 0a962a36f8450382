"""Several reports side by side: the evaluation protocols they share, tables and scatter plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sparsify.report.data import fmt_windows
from sparsify.report.html import _arrow, _grade_chip, _nowrap, _page, _short_path, _slashes
from sparsify.report.text import _e, _md_table, _text_table, md
from sparsify.report.views import _eval_pairs, _is_number, fmt_count, fmt_kl, fmt_ppl, fmt_seconds, headline
from sparsify.sizes import fmt_bytes


def eval_protocol(report: dict[str, Any]) -> dict[str, Any] | None:
    """What the report's quality number was measured on: the text, how many windows of how many tokens (the first
    length's; encoders: paragraphs) and, in newer reports, the digest of those windows; None without one."""
    ev = report.get("eval") or {}
    cosine = ev.get("metric") == "cosine"
    first = next(iter(_eval_pairs(ev)), None)
    if not cosine and first is None:
        return None
    return {
        "metric": "cosine" if cosine else "perplexity",
        "text": ev.get("text"),
        "windows": ev.get("texts") if cosine else first.get("windows"),
        "seq_len": ev.get("seq_len") if cosine else first.get("seq_len"),
        "digest": ev.get("digest") or None,
    }


def protocol_label(protocol: dict[str, Any]) -> str:
    """``builtin:pydoc-topics-heldout, 16 windows × 512 tokens``."""
    if protocol["metric"] == "cosine":
        return f"{protocol['text']}, {protocol['windows']} paragraphs of ≤{protocol['seq_len']} tokens"
    return f"{protocol['text']}, {fmt_windows(protocol['windows'], protocol['seq_len'])}"


def protocol_groups(protocols: list[dict[str, Any] | None]) -> list[list[int]]:
    """The indices of the outputs whose quality numbers compare: measured on the same text, windows and window
    length, with the same digest where both have one. Where digests disagree, those without one stand apart (they
    could be either); an output without a measurement is in no group. Groups in order of their first output."""
    by_key: dict[tuple[str, ...], list[int]] = {}
    for i, p in enumerate(protocols):
        if p is not None:
            by_key.setdefault(tuple(str(p[k]) for k in ("metric", "text", "windows", "seq_len")), []).append(i)
    groups = []
    for members in by_key.values():
        digest = {i: str(protocols[i]["digest"] or "") for i in members}  # type: ignore[index]
        seen = list(dict.fromkeys(d for d in digest.values() if d))
        if len(seen) <= 1:
            groups.append(members)
        else:
            groups += [g for d in [*seen, ""] if (g := [i for i in members if digest[i] == d])]
    return sorted(groups)


def _compare_rows(reports: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str], int | None]:
    """Each report's headline numbers, with ``protocol`` and ``group`` (its letter where the outputs were measured
    under several protocols, else ""; None: not measured) and ``best`` (the tag of the best quality number in a
    group of two or more: ``best``, ``best of B``); the lines a reader must see first; the smallest size's index."""
    rows = [{**headline(r), "report": r, "group": None, "protocol": None, "best": ""} for r in reports]
    protocols = [eval_protocol(r) for r in reports]
    groups = protocol_groups(protocols)
    base = [protocol_label(protocols[g[0]]) for g in groups]  # type: ignore[arg-type]
    labels = list(base)
    for k, g in enumerate(groups):
        if base.count(base[k]) > 1:  # the same text and windows, other tokens
            digest = protocols[g[0]]["digest"]  # type: ignore[index]
            labels[k] += f", windows {str(digest)[:12]}" if digest else ", windows not recorded"
    for k, members in enumerate(groups):
        letter = chr(ord("A") + k) if len(groups) > 1 else ""
        scored = []
        for i in members:
            rows[i].update(group=letter, protocol=labels[k])
            score = rows[i]["ppl_after"] if rows[i]["cosine_mean"] is None else -rows[i]["cosine_mean"]
            if _is_number(score):
                scored.append((score, i))
        if len(scored) > 1:
            rows[min(scored)[1]]["best"] = f"best of {letter}" if letter else "best"
    caveats = []
    models = sorted({str(r.get("model")) for r in reports})
    if len(models) > 1:
        caveats.append(f"these outputs come from different models ({', '.join(models)}): their numbers do not compare")
    if len(groups) > 1:
        names = [Path(str(r.get("output", "?"))).name for r in reports]
        each = "; ".join(
            f"{chr(ord('A') + k)} = {labels[k]} ({', '.join(names[i] for i in g)})" for k, g in enumerate(groups)
        )
        caveats.append(
            f"quality measured under {len(groups)} evaluation protocols; outputs compared only within one: {each}"
        )
    sizes = [(h["bytes_after"], i) for i, h in enumerate(rows) if h["bytes_after"] is not None]
    return rows, caveats, min(sizes)[1] if len(sizes) > 1 else None


def _one_protocol(rows: list[dict[str, Any]]) -> str | None:
    """The protocol every measured output shares (None: several, or none measured)."""
    return rows[0]["protocol"] if len({h["group"] for h in rows} - {None}) == 1 else None


def _compare_cells(h: dict[str, Any]) -> dict[str, str]:
    """The comparison's cells as plain text (the HTML page escapes and decorates them)."""
    r = h["report"]
    size = "—"
    if h["bytes_after"] is not None:
        size = fmt_bytes(h["bytes_after"]) + (
            f" ({h['bytes_after'] / h['bytes_before']:.2f}×)" if h["bytes_before"] else ""
        )
    if h["cosine_mean"] is not None:
        value = f"{h['cosine_mean']:.4f}"
    elif h["ppl_after"] is not None:
        value = f"{fmt_ppl(h['ppl_before'])} → {fmt_ppl(h['ppl_after'])}" + (
            f" ({h['ppl_ratio']:.3f}×)" if h["ppl_ratio"] else ""
        )
    else:
        value = "not measured"
    grade = h["grade"][0] if h["grade"] else h["quality"] or "—"
    if h["grade"] and h["quality"] not in (None, "ok"):
        grade += f"; {h['quality']}"
    return {
        "output": str(r.get("output", "?")),
        "passes": "; ".join(p.get("description", p.get("type", "?")) for p in r.get("passes") or []) or "—",
        "size": size,
        "parameters": fmt_count(h["params_after"]),
        "value": value,
        "kl": fmt_kl(h["kl"]) if h["kl"] else "—",
        "grade": grade,
        "latency": f"{fmt_seconds(h['latency_after'])} ({h['latency_before'] / h['latency_after']:.2f}× speed)"
        if h["latency_after"] and h["latency_before"]
        else "—",
        "wall": fmt_seconds(h["wall_seconds"]),
    }


def _compare_columns(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """``(cell key, header, HTML class)`` of the comparison's columns; KL and latency where some output has them."""
    has_cos = any(h["cosine_mean"] is not None for h in rows)
    return [
        ("output", "output", "path"),
        ("passes", "passes", "passes"),
        ("size", "size on disk", "num"),
        ("parameters", "parameters", "num"),
        ("value", "cosine to input" if has_cos else "perplexity", "num"),
        *([("kl", "KL to input", "num")] if any(h["kl"] for h in rows) else []),
        ("grade", "quality", ""),
        *([("latency", "latency", "num")] if any(h["latency_after"] for h in rows) else []),
        ("wall", "wall time", "num"),
    ]


def render_compare_html(reports: list[dict[str, Any]]) -> str:
    """Several outputs side by side (one row each): size, parameters, perplexity before → after, quality, latency,
    wall time and passes; the best quality number (per evaluation protocol) and the smallest size highlighted."""
    rows, caveats, smallest = _compare_rows(reports)
    columns = _compare_columns(rows)
    top_bytes = max([0, *(h["bytes_after"] or 0 for h in rows), *(h["bytes_before"] or 0 for h in rows)]) or 1
    head = "<tr class='head'>" + "".join(f"<th class='{cls}'>{_e(title)}</th>" for _, title, cls in columns) + "</tr>"
    body = []
    for i, h in enumerate(rows):
        text = _compare_cells(h)
        cells = {key: _e(value) for key, value in text.items()}
        for key in ("size", "parameters", "latency", "wall", "kl"):  # each number with its unit on one line
            cells[key] = ", ".join(_nowrap(part) for part in text[key].split(", "))
        cells["output"] = (
            f'<b>{_e(Path(text["output"]).name)}</b><br><span class="small muted">{_slashes(text["output"])}</span>'
        )
        if h["bytes_after"] is not None:
            bar = f'<span class="bar" style="width:{60 * h["bytes_after"] / top_bytes:.0f}px"></span> '
            cells["size"] = bar + cells["size"] + ('<span class="tag">smallest</span>' if i == smallest else "")
        if h["ppl_after"] is not None and h["cosine_mean"] is None:
            ratio = f" <span class='muted'>({h['ppl_ratio']:.3f}×)</span>" if h["ppl_ratio"] else ""
            cells["value"] = _arrow(fmt_ppl(h["ppl_before"]), fmt_ppl(h["ppl_after"])) + ratio
        if h["group"]:
            cells["value"] += f'<span class="tag proto" title="evaluation protocol {h["group"]}">{h["group"]}</span>'
        if h["best"]:
            cells["value"] += f'<span class="tag">{_e(h["best"])}</span>'
        if h["grade"] and (status := h["quality"]) not in (None, "ok"):
            cells["grade"] = _grade_chip(h, False) + f' <span class="chip {_e(status)}">{_e(status)}</span>'
        else:
            cells["grade"] = _grade_chip(h, False) or "—"
        body.append(
            f"<tr{' class=best' if h['best'] or i == smallest else ''}>"
            + "".join(
                f'<td class="{cls}" data-label="{_e(title)}"><span>{cells[key]}</span></td>'
                for key, title, cls in columns
            )
            + "</tr>"
        )
    models = sorted({str(r.get("model")) for r in reports})
    protocol = _one_protocol(rows)
    measured = f"Measured on {_e(protocol)}. " if protocol else ""
    body_html = (
        f'<header><p class="eyebrow">sparsify comparison · {len(reports)} outputs</p>'
        f"<h1>{', '.join(_short_path(m) for m in models)}</h1>"
        f'<p class="small muted path">{_slashes(", ".join(models))}</p></header>'
        + "".join(f'<div class="banner warning">{_e(c)}</div>' for c in caveats)
        + f'<section><div class="scroll"><table class="cmp">{head}{"".join(body)}</table></div>'
        f'<p class="small muted">{measured}Highlighted: the best perplexity (lowest after; for encoders the highest'
        " cosine similarity) among outputs measured alike, and the smallest size on disk.</p></section>"
        + _scatters(rows)
    )
    return _page("sparsify comparison", body_html)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering ``[lo, hi]`` (steps of 1, 2, 2.5 or 5 times a power of ten)."""
    span = (hi - lo) or abs(hi) or 1.0
    raw = span / n
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.floor(lo / step) * step
    ticks = [first]
    while ticks[-1] < hi - step * 1e-9 or len(ticks) < 2:  # the last tick at or past hi
        ticks.append(round(first + len(ticks) * step, 12))
    return ticks


def _scatters(rows: list[dict[str, Any]]) -> str:
    """Size against perplexity after, one chart per evaluation protocol (perplexities measured differently share no
    axis); each with its input as a grey point where the outputs agree on one."""
    charts = []
    for group in dict.fromkeys(h["group"] for h in rows if h["group"] is not None and h["cosine_mean"] is None):
        members = [h for h in rows if h["group"] == group and h["cosine_mean"] is None]
        points = [(h["bytes_after"], h["ppl_after"], Path(str(h["report"].get("output", "?"))).name) for h in members]
        points = [p for p in points if p[0] and _is_number(p[1])]
        inputs = {(h["bytes_before"], h["ppl_before"]) for h in members if h["bytes_before"] and h["ppl_before"]}
        if len(inputs) == 1:
            points.append((*inputs.pop(), "input"))
        if len(points) >= 2:
            charts.append(_scatter(points, f"protocol {group}: " * bool(group) + members[0]["protocol"]))
    if not charts:
        return ""
    return f"<section><h2>Size against quality</h2>{''.join(charts)}</section>"


def _scatter(points: list[tuple[float, float, str]], protocol: str) -> str:
    """One chart: a labelled point per output (and ``input``, grey); it scales to the width it is given."""
    w, h, left, bottom, top, right = 480, 280, 74, 40, 14, 16
    unit = next(u for u in (1, 2**10, 2**20, 2**30, 2**40) if max(p[0] for p in points) / u < 1024 or u == 2**40)
    unit_name = {1: "B", 2**10: "KiB", 2**20: "MiB", 2**30: "GiB", 2**40: "TiB"}[unit]
    x_ticks = _nice_ticks(0.0, max(p[0] for p in points) / unit * 1.05)
    ys = [p[1] for p in points]
    log = min(ys) > 0 and max(ys) / min(ys) > 20  # one output far off: a log axis keeps the others apart
    if log:
        y_ticks = [10.0**k for k in range(math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys))) + 1)]
    else:
        y_ticks = _nice_ticks(min(ys), max(ys), 4)
    f = math.log10 if log else float
    x0, x1 = 0.0, x_ticks[-1] * unit
    y0, y1 = f(y_ticks[0]), f(y_ticks[-1])

    def sx(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * (w - left - right)

    def sy(v: float) -> float:
        return top + (y1 - f(v)) / ((y1 - y0) or 1.0) * (h - top - bottom)

    font = 12
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img"'
        f' aria-label="size against perplexity" font-size="{font}">',
    ]
    for xv in x_ticks:
        out.append(
            f'<line x1="{sx(xv * unit):.1f}" y1="{top}" x2="{sx(xv * unit):.1f}" y2="{h - bottom}" stroke="#eceef2"/>'
        )
        out.append(f'<text x="{sx(xv * unit):.1f}" y="{h - bottom + 15}" text-anchor="middle">{xv:g}</text>')
    for yv in y_ticks:
        out.append(f'<line x1="{left}" y1="{sy(yv):.1f}" x2="{w - right}" y2="{sy(yv):.1f}" stroke="#eceef2"/>')
        out.append(f'<text x="{left - 6}" y="{sy(yv) + 4:.1f}" text-anchor="end">{yv:,g}</text>')
    out += [
        f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="#8a93a3"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="#8a93a3"/>',
        f'<text x="{(left + w - right) / 2}" y="{h - 6}" text-anchor="middle" fill="#5d6678">size on disk'
        f" ({unit_name}) →</text>",
        f'<text transform="translate(14 {(top + h - bottom) / 2}) rotate(-90)" text-anchor="middle"'
        f' fill="#5d6678">perplexity after{" (log scale)" * log} →</text>',
    ]
    placed: list[tuple[float, float, float, float]] = []  # label boxes so far: x0, y0, x1, y1
    for x, y, name in sorted(points, key=lambda p: (p[1], p[0])):
        fill = "#8a93a3" if name == "input" else "#2b5fad"
        cx, cy = sx(x), sy(y)
        tw = len(name) * font * 0.6
        spot = None
        for dx, dy, anchor in ((8, -7, "start"), (8, 13, "start"), (-8, -7, "end"), (-8, 13, "end"), (8, 3, "start")):
            bx = cx + dx if anchor == "start" else cx + dx - tw
            box = (bx, cy + dy - 10, bx + tw, cy + dy + 2)
            inside = box[0] >= left and box[2] <= w - 2 and box[1] >= 0 and box[3] <= h - bottom
            if inside and not any(b[0] < box[2] and box[0] < b[2] and b[1] < box[3] and box[1] < b[3] for b in placed):
                spot = (dx, dy, anchor, box)
                break
        dx, dy, anchor, box = spot or (8, -7, "start", (cx, cy, cx, cy))
        placed.append(box)
        out.append(
            f'<circle class="{"input" if name == "input" else "output"}" cx="{cx:.1f}" cy="{cy:.1f}" r="5"'
            f' fill="{fill}"><title>{_e(name)}: {_e(fmt_bytes(x))}, perplexity {_e(fmt_ppl(y))}</title></circle>'
            f'<text x="{cx + dx:.1f}" y="{cy + dy:.1f}" text-anchor="{anchor}">{_e(name)}</text>'
        )
    out.append("</svg>")
    grey = "; grey: the input" if any(p[2] == "input" for p in points) else ""
    caption = f'<p class="small muted">{_e(protocol)}; down and left is better{grey}</p>'
    return f'<div class="chart">{caption}{"".join(out)}</div>'


def _compare_plain(reports: list[dict[str, Any]]) -> tuple[list[str], list[str], list[list[str]], set[int]]:
    """The comparison as plain text: the lines to read first, the header, one row per output (tags in brackets),
    the columns of numbers."""
    rows, lines, smallest = _compare_rows(reports)
    columns = _compare_columns(rows)
    table = []
    for i, h in enumerate(rows):
        cells = _compare_cells(h)
        cells["size"] += " (smallest)" * (i == smallest)
        cells["value"] += f" [{h['group']}]" * bool(h["group"]) + f" ({h['best']})" * bool(h["best"])
        table.append([cells[key] for key, _, _ in columns])
    if protocol := _one_protocol(rows):
        lines.append(f"quality measured on {protocol}")
    return lines, [title for _, title, _ in columns], table, {k for k, c in enumerate(columns) if "num" in c[2]}


def render_compare_markdown(reports: list[dict[str, Any]]) -> str:
    """:func:`render_compare_html` as a Markdown table."""
    lines, header, table, _ = _compare_plain(reports)
    models = sorted({str(r.get("model")) for r in reports})
    out = [f"# sparsify comparison: {md(', '.join(models))}", "", *(f"> {md(line)}" for line in lines)]
    return "\n".join([*out, "", *_md_table(header, table)]) + "\n"


def render_compare_text(reports: list[dict[str, Any]]) -> str:
    """:func:`render_compare_html` for a terminal: plain text, one row per output."""
    lines, header, table, numbers = _compare_plain(reports)
    return "\n".join([*lines, *([""] if lines else []), *_text_table(header, table, numbers)]) + "\n"
