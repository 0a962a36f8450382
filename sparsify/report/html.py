"""The report as one self-contained HTML page: cards, size breakdown, each pass's settings, maps and table."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sparsify.report.data import fmt_windows
from sparsify.report.heatmap import METRICS, PART_COLORS, _heatmap
from sparsify.report.text import CSS, _e, _size_rows, summary_rows
from sparsify.report.views import (
    _eval_pairs,
    _fmt,
    _is_number,
    _module_of,
    _pass_views,
    _used_columns,
    fmt_count,
    fmt_pct,
    fmt_ppl,
    fmt_seconds,
    fmt_sig,
    headline,
)
from sparsify.sizes import PART_LABELS, PARTS, fmt_bytes


def _kv(rows: list[tuple[str, str]] | list[list[str]]) -> str:
    return (
        '<div class="scroll"><table class="kv">'
        + "".join(f"<tr><th>{_e(str(k))}</th><td>{_e(str(v))}</td></tr>" for k, v in rows)
        + "</table></div>"
    )


def _records_table(columns: list[list[str]], records: list[dict[str, Any]]) -> str:
    head = "".join(
        f'<th class="{"num" if fmt in ("pct", "err", "s") else ""}">{_e(header)}</th>' for _, header, fmt in columns
    )
    body = []
    for r in records:
        cells = []
        for i, (key, _, fmt) in enumerate(columns):
            cls = "name" if i == 0 else "num" if fmt in ("pct", "err", "s") else ""
            value = r.get(key)
            title = f' title="{_e(repr(value))}"' if isinstance(value, float) else ""
            cells.append(f'<td class="{cls}"{title}>{_e(_fmt(value, fmt))}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table><tr>{head}</tr>{"".join(body)}</table></div>'


def _settings(settings: dict[str, Any]) -> str:
    def show(v: Any) -> str:
        if isinstance(v, dict):
            return ", ".join(f"{k} {show(x)}" for k, x in v.items())
        if isinstance(v, list):
            return ", ".join(show(x) for x in v) or "[]"
        return f"{v:g}" if isinstance(v, float) else str(v)

    items = "".join(f"<span><b>{_e(k)}</b> {_e(show(v))}</span>" for k, v in settings.items())
    return f'<div class="settings">{items}</div>' if items else ""


def _mark_shared_errors(views: list[dict[str, Any]]) -> None:
    """Each Linear's output error is measured once, after every pass that ran on it in the same stage: passes
    whose records carry the same measurement get ``shared_error`` (a note, and the pass whose map already
    shows it when the measurements are all the same)."""
    sets: list[tuple[int, frozenset]] = []
    for v in views:
        pairs = frozenset((str(r.get("name")), r["rel_error"]) for r in v["records"] if _is_number(r.get("rel_error")))
        sets.append((v["index"], pairs))
    for v, (index, pairs) in zip(views, sets, strict=True):
        together = sorted({j for j, other in sets if other & pairs})
        if len(together) < 2:
            continue
        names = ", ".join(str(j + 1) for j in together[:-1]) + f" and {together[-1] + 1}"
        same_as = next((j for j, other in sets if other == pairs and j < index), None)
        v["shared_error"] = {
            "note": f"measured once per Linear after passes {names} ran on it: their combined error",
            "same_as": same_as,
        }


def _pass_section(
    report: dict[str, Any], view: dict[str, Any], shown_kinds: set[str], n_passes: int, measured: list | None = None
) -> str:
    kind, records = view["kind"], view["records"]
    table = next((t for t in report.get("tables") or [] if t.get("kind") == kind), None)
    out = [
        f'<section id="pass-{_e(str(view["index"]))}"><p class="eyebrow">pass {view["index"] + 1} of {n_passes} ·'
        f" {_e(str(view['type']))}</p><h2>{_e(view['description'])}</h2>",
        _settings(view["settings"]),
    ]
    by_kind = report.get("summary_by_kind")
    if by_kind is not None and kind in by_kind and kind not in shown_kinds:
        shown_kinds.add(kind)
        out.append(_kv(by_kind[kind]))
    elif measured:
        out.append(_kv(measured))
    if view["notes"]:
        out.append("<ul>" + "".join(f"<li>{_e(n)}</li>" for n in view["notes"]) + "</ul>")
    per_linear = any(_module_of(r) for r in records)
    shared = view.get("shared_error")
    maps = []
    for key in METRICS:
        if key == "rel_error" and shared and shared["same_as"] is not None:
            maps.append(
                f'<div class="map"><h3>{_e(METRICS[key][0])}</h3><p class="small">the same measurement as pass'
                f" {shared['same_as'] + 1}'s map: {_e(shared['note'])}</p></div>"
            )
            continue
        maps.append(_heatmap(records, key, note=shared["note"] if key == "rel_error" and shared else ""))
    maps = [m for m in maps if m]
    if maps:
        out.append(f'<div class="maps">{"".join(maps)}</div>')
    if records:
        columns = [list(c) for c in table["columns"]] if table else [[k, k, "text"] for k in ("name", "status")]
        used, same = _used_columns(columns, records)
        what = "Linear" if per_linear else "layer"
        opened = " open" if len(records) <= 8 else ""
        out.append(
            f"<details{opened}><summary>Per-{what} table ({len(records)} rows)</summary>"
            + (f'<p class="small muted">every row: {_e("; ".join(same))}</p>' if same else "")
            + _records_table(used, records)
            + "</details>"
        )
    elif not view["notes"]:
        out.append('<p class="small muted">No per-layer records for this pass.</p>')
    out.append("</section>")
    return "".join(out)


def _card(label: str, big: str, sub: str = "", title: str = "") -> str:
    tip = f' title="{_e(title)}"' if title else ""
    return (
        f'<div class="card"{tip}><div class="label">{_e(label)}</div><div class="big">{big}</div>'
        + (f'<div class="sub">{sub}</div>' if sub else "")
        + "</div>"
    )


def _arrow(before: str | None, after: str) -> str:
    return f'{_e(before)}<span class="arrow">→</span>{_e(after)}' if before is not None else _e(after)


def _ratio_text(ratio: float, lower_is_better: bool = True) -> str:
    """``0.40×`` coloured good or bad."""
    good = ratio < 1 if lower_is_better else ratio > 1
    cls = "good" if good and abs(ratio - 1) > 0.005 else "bad" if abs(ratio - 1) > 0.005 else ""
    return f'<span class="{cls}">{ratio:.2f}×</span>'


def _cards(report: dict[str, Any]) -> str:
    """The headline: each number after compression, big, with where it came from underneath."""
    h = headline(report)
    cards = []
    if h["bytes_after"] is not None:
        sub = ""
        if h["bytes_before"]:
            sub = f"from {_e(fmt_bytes(h['bytes_before']))} · {_ratio_text(h['bytes_after'] / h['bytes_before'])}"
        cards.append(
            _card("size on disk", _e(fmt_bytes(h["bytes_after"])), sub, f"{h['bytes_before']} → {h['bytes_after']} B")
        )
    if h["params_after"] is not None:
        subs = []
        if h["params_before"]:
            subs.append(f"from {fmt_count(h['params_before'])} · {_ratio_text(h['params_after'] / h['params_before'])}")
        if h["zeros"] and h["zeros"] >= 0.005:
            subs.append(f"{fmt_pct(h['zeros'])} of them zero")
        cards.append(
            _card(
                "parameters",
                _e(fmt_count(h["params_after"])),
                "<br>".join(subs),
                f"{h['params_before'] or '?'} → {h['params_after']}, {h['nonzeros'] or '?'} non-zero",
            )
        )
    if h["ppl_after"] is not None:
        pairs = _eval_pairs(report.get("eval"))
        more = "<br>".join(
            f"@{_e(str(e['seq_len']))}: {_e(fmt_ppl(e['before']))} → {_e(fmt_ppl(e['after']))}" for e in pairs[1:]
        )
        sub = f"from {_e(fmt_ppl(h['ppl_before']))} · {_ratio_text(h['ppl_ratio'])}<br>{_e(h['ppl_windows'])}"
        if rec := h["ppl_before_recovery"]:
            sub += f"<br>{_e(fmt_ppl(rec['perplexity']))} before {_e(rec['step'])}"
        cards.append(
            _card(
                "perplexity",
                _e(fmt_ppl(h["ppl_after"])),
                sub + (f"<br>{more}" if more else ""),
                f"{h['ppl_before']!r} → {h['ppl_after']!r} on {h['eval_text']}",
            )
        )
        if kl := h["kl"]:
            cards.append(
                _card(
                    "KL to the input",
                    _e(fmt_sig(kl["mean"], pad=False)),
                    f"mean per token · p99 {_e(fmt_sig(kl['p99'], pad=False))}"
                    f"<br>top-1 agreement {_e(fmt_pct(kl['top1']))}",
                    f"KL(input || output) of the next-token distribution: {kl['mean']!r} mean, {kl['p99']!r} p99",
                )
            )
    elif h["cosine_mean"] is not None:
        cards.append(
            _card(
                "similarity to the input",
                _e(f"{h['cosine_mean']:.4f}"),
                f"mean cosine of embeddings; min {h['cosine_min']:.4f}",
                f"{h['cosine_mean']!r} mean, {h['cosine_min']!r} min on {h['eval_text']}",
            )
        )
    if h["latency_after"]:
        sub = f"forward pass, {_e(str(h['latency_len']))} tokens"
        if h["latency_before"]:
            speed = h["latency_before"] / h["latency_after"]
            sub = f"from {_e(fmt_seconds(h['latency_before']))} · {_ratio_text(speed, False)} speed<br>{sub}"
        cards.append(_card("latency", _e(fmt_seconds(h["latency_after"])), sub))
    if h["wall_seconds"] is not None:
        sub = f"{_e(fmt_bytes(h['peak_rss_bytes']))} peak memory" if h["peak_rss_bytes"] is not None else ""
        cards.append(_card("this run took", _e(fmt_seconds(h["wall_seconds"])), sub))
    return f'<div class="cards">{"".join(cards)}</div>' if cards else ""


def _grade_chip(h: dict[str, Any], ratio: bool = True) -> str:
    """The graded badge (``small loss · perplexity ×1.12``); the verdict's status where there is no ratio."""
    if h["grade"]:
        label, cls = h["grade"]
        return f'<span class="chip {cls}">{_e(label)}' + f" · perplexity ×{h['grade_ratio']:.2f}" * ratio + "</span>"
    return f'<span class="chip">quality {_e(h["quality"])}</span>' if h["quality"] else ""


def _quality(report: dict[str, Any]) -> tuple[str, str]:
    """(a chip for the header, a banner when the verdict is not ok)."""
    q = report.get("quality") or {}
    status = q.get("status")
    if status is None and not report.get("eval"):
        return '<span class="chip">quality not measured</span>', ""
    chip = _grade_chip(headline(report))
    if status in (None, "ok"):
        return chip, ""
    head = "Quality check failed" if status == "failed" else "Quality warning"
    return (
        chip,
        f'<div class="banner {_e(status)}" role="alert"><strong>{head}</strong>{_e(q.get("message", ""))}</div>',
    )


def _stack(part_sizes: dict[str, Any], scale: float) -> str:
    total = sum(v["bytes"] for v in part_sizes.values()) or 1
    spans = "".join(
        f'<span style="width:{100 * part_sizes[p]["bytes"] / scale:.3f}%;background:{PART_COLORS[p]}"'
        f' title="{_e(PART_LABELS[p])}: {_e(fmt_bytes(part_sizes[p]["bytes"]))}'
        f' ({100 * part_sizes[p]["bytes"] / total:.1f}%)"></span>'
        for p in PARTS
        if p in part_sizes and part_sizes[p]["bytes"]
    )
    return f'<div class="stack" style="width:{100 * total / scale:.2f}%">{spans}</div>'


def _sizes_section(report: dict[str, Any]) -> str:
    sizes = report.get("sizes") or {}
    before, after = sizes.get("input") or {}, sizes.get("output") or {}
    if not before or not after:
        return ""
    tb = sum(v["bytes"] for v in before.values())
    ta = sum(v["bytes"] for v in after.values())
    scale = max(tb, ta) or 1
    present = [p for p in PARTS if p in before or p in after]
    legend = "".join(f'<span><i style="background:{PART_COLORS[p]}"></i>{_e(PART_LABELS[p])}</span>' for p in present)
    bars = "".join(
        f'<div class="stackrow"><span class="small">{label}</span>{_stack(s, scale)}'
        f'<span class="small num">{_e(fmt_bytes(t))}</span></div>'
        for label, s, t in (("input", before, tb), ("output", after, ta))
    )
    rows = "".join(
        f'<tr><td class="part"><i style="background:{PART_COLORS[part]}"></i>{_e(PART_LABELS[part])}</td>'
        + "".join(f'<td class="num">{_nowrap(x[0])}<br><span class="muted">{_nowrap(x[1])}</span></td>' for x in pair)
        + f'<td class="num">{_e(change)}</td></tr>'
        for part, *pair, change in _size_rows(report)
    )
    table = (
        '<div class="scroll"><table class="sizes"><tr><th>part</th><th class="num">input</th>'
        f'<th class="num">output</th><th class="num">output / input</th></tr>{rows}</table></div>'
    )
    return (
        '<section id="sizes"><h2>Where the bytes are</h2>'
        '<p class="small muted">tensor bytes (parameters) per part of the model; quantization scales count with'
        " their weights (bytes, not parameters)</p>"
        f'<div class="legend">{legend}</div>{bars}{table}</section>'
    )


def _short_path(path: Any) -> str:
    """A folder as a title: its name without a cache's hash suffix (``SmolLM2-135M-Instruct.Q4_1``), the full path in
    the title attribute; a Hub id (``org/name``) as it is."""
    full = str(path if path is not None else "?")
    hub = full.count("/") == 1 and not full.startswith((".", "/", "~"))
    name = full if hub else re.sub(r"-[0-9a-f]{12,}$", "", Path(full).name) or full
    return f'<span class="path" title="{_e(full)}">{_e(name)}</span>'


def _nowrap(text: str) -> str:
    """``text`` escaped, kept on one line (a number and its unit)."""
    return f'<span class="nw">{_e(text)}</span>'


def _slashes(path: Any) -> str:
    """``path`` escaped, with a line break allowed after each slash (a long path wraps at its folders)."""
    return f'<span title="{_e(str(path))}">{_e(str(path)).replace("/", "/<wbr>")}</span>'


def _page(title: str, body: str) -> str:
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>\n{body}\n</main></body></html>\n"
    )


def render_html(report: dict[str, Any], baseline: dict[str, Any] | None = None) -> str:
    """The report as one self-contained page: headline numbers, quality verdict, size by part, one section per
    pass (settings, what it measured, heat maps by layer and module, the folded per-record table), notes."""
    chip, banner = _quality(report)
    views = _pass_views(report)
    chips = "".join(f'<a class="chip" href="#pass-{_e(str(v["index"]))}">{_e(v["description"])}</a>' for v in views)
    created = str(report.get("created", ""))[:16].replace("T", " ")
    header = (
        f'<header><p class="eyebrow">sparsify report · {_e(str(report.get("model_type", "")))}'
        f"{' · ' + _e(created) if created else ''}</p>"
        f'<h1>{_short_path(report.get("model"))} <span class="muted">→</span> {_short_path(report.get("output"))}</h1>'
        f'<p class="small muted path">{_slashes(report.get("model", "?"))} → {_slashes(report.get("output", "?"))}</p>'
        f'<div class="chips">{chip}{chips}</div></header>'
    )
    sections = [header, banner, _cards(report)]
    by_length = _eval_pairs(report.get("eval"))
    sections.append(_sizes_section(report))
    _mark_shared_errors(views)
    shown: set[str] = set()
    # reports before summary_by_kind: their summary under the pass when there is one, else on its own
    old_summary = report.get("summary") if report.get("summary_by_kind") is None else None
    for v in views:
        sections.append(_pass_section(report, v, shown, len(views), old_summary if len(views) == 1 else None))
    if old_summary and len(views) != 1:
        sections.append(f"<section><h2>What the passes measured</h2>{_kv(report['summary'])}</section>")
    if len(by_length) > 1:
        rows = "".join(
            f'<tr><td class="num">{_e(fmt_windows(e.get("windows", "?"), e["seq_len"]))}</td>'
            f'<td class="num">{_e(fmt_ppl(e["before"]))}</td><td class="num">{_e(fmt_ppl(e["after"]))}</td>'
            f'<td class="num">{e["after"] / e["before"]:.3f}×</td></tr>'
            for e in by_length
        )
        sections.append(
            '<section><h2>Perplexity by context length</h2><div class="scroll"><table><tr><th class="num">measured on'
            '</th><th class="num">before</th><th class="num">after</th><th class="num">after / before</th></tr>'
            f"{rows}</table></div></section>"
        )
    pass_notes = {f"pass {v['index']}:" for v in views}
    notes = [n for n in report.get("notes", []) if not any(n.startswith(p) for p in pass_notes)]
    if notes:
        sections.append("<section><h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul></section>")
    sections.append(
        "<section><details><summary>Every number as text (the summary the CLI prints)</summary>"
        f"{_kv(summary_rows(report, baseline))}</details></section>"
    )
    sections.append(
        f"<footer>sparsify {_e(str(report.get('sparsify_version', '?')))} · run {_e(str(report.get('run_id', '?')))}"
        f" · seed {_e(str(report.get('seed', '?')))} · loads with {_e(str(report.get('loader', 'transformers')))}"
        "</footer>"
    )
    return _page(f"sparsify report: {report.get('output', '')}", "\n".join(s for s in sections if s))


# ---------------------------------------------------------------------------------------------- compare
