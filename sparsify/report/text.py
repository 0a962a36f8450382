"""The report as text: the summary the CLI prints, Markdown, the terminal view."""

from __future__ import annotations

import html
import math
from typing import Any

from sparsify.report.data import fmt_windows
from sparsify.report.views import (
    _eval_pairs,
    _fmt,
    _is_number,
    _kl,
    _module_of,
    _pass_views,
    _tables,
    _used_columns,
    fmt_count,
    fmt_kl,
    fmt_pct,
    fmt_seconds,
    fmt_sig,
    headline,
)
from sparsify.sizes import PART_LABELS, PARTS, fmt_bytes


def summary_rows(report: dict[str, Any], baseline: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """Every number as ``(label, text)``: the CLI's summary, the model card, the page's text view."""
    t = report.get("totals") or {}
    descriptions = [p["description"] for p in report.get("passes", [])] or [
        p["type"] for p in report["recipe"]["passes"]
    ]
    rows = [("model", f"{report['model']} ({report['model_type']})"), ("output", report["output"]),
            ("passes", "; ".join(descriptions))]  # fmt: skip
    if cal := report.get("calibration"):
        why = f"; {cal['why']}" if cal.get("why") else ""
        text = f"{fmt_windows(cal['windows'], cal['seq_len'])} of {cal['text']} (seed {report.get('seed')}{why})"
        rows.append(("calibration", text))
    rows += [(label, text) for label, text in report.get("summary", [])]
    if t.get("parameters") is not None:
        q = f" in floating point + {t['quantized_parameters']:,} quantized" if t.get("quantized_parameters") else ""
        zeros = fmt_pct(t.get("overall_sparsity"))
        rows.append(("parameters", f"{t['parameters']:,} ({t['nonzeros']:,} non-zero, {zeros} zeros){q}"))
    if t.get("bytes") is not None:
        ib = t.get("input_bytes")
        vs = f" ({t['bytes'] / ib:.3f}× the input's {fmt_bytes(ib)})" if ib else ""
        rows.append(("size on disk", fmt_bytes(t["bytes"]) + vs))
    if t.get("wall_seconds") is not None:
        rows.append(("wall time", fmt_seconds(t["wall_seconds"])))
    if t.get("peak_rss_bytes") is not None:
        rows.append(("peak memory (RSS)", fmt_bytes(t["peak_rss_bytes"])))
    ev = report.get("eval")
    if ev and ev.get("metric") == "cosine":
        text = (f"cosine to dense {ev['cosine_mean']:.4f} mean, {ev['cosine_min']:.4f} min ({ev['texts']} paragraphs"
                f" of {ev['text']}, ≤{ev['seq_len']} tokens, mean-pooled)")  # fmt: skip
        rows.append(("embedding similarity", text))
    for k, e in enumerate(_eval_pairs(ev)):
        label = "perplexity" if "by_length" not in ev else f"perplexity @{e['seq_len']}"
        rec = ev.get("before_recovery") if k == 0 else None
        healed = f"; {rec['perplexity']:.3f} before {rec['step']}" if rec else ""
        where = f"{ev['text']}, {fmt_windows(e['windows'], e['seq_len'])}, stride {e['seq_len']}{healed}"
        rows.append((label, f"{e['before']:.3f} → {e['after']:.3f} ({where})"))
    if ev and (kl := _kl(ev)):
        where = f"{fmt_sig(kl.get('tokens'))} tokens in windows of {kl.get('seq_len')}"
        rows.append(("KL to input", f"{fmt_kl(kl)} ({where})"))
    if grade := (h := headline(report))["grade"]:
        rows.append(("quality", f"{grade[0]}: perplexity {h['grade_ratio']:.2f}× the input's"))
    lat = report.get("latency")
    if lat and lat.get("before_s") and lat.get("after_s"):
        speed = f"{lat['before_s'] / lat['after_s']:.2f}× the input's speed"
        each = f"per forward pass of {lat.get('seq_len')} tokens ({speed})"
        text = f"{fmt_seconds(lat['before_s'])} → {fmt_seconds(lat['after_s'])} {each}"
        rows.append(("latency", text))
    quality = report.get("quality")
    if quality and quality.get("status") != "ok":
        rows.append(("QUALITY", f"{quality['status'].upper()}: {quality['message']}"))
    if baseline:
        rows += [
            ("baseline", f"{baseline['path']}: {baseline['parameters']:,} parameters, {fmt_bytes(baseline['bytes'])}"),
            ("non-zeros vs baseline", f"{t['nonzeros'] / max(baseline['nonzeros'], 1):.3f}×"),
            ("bytes vs baseline", f"{t['bytes'] / max(baseline['bytes'], 1):.3f}×"),
        ]
    return rows


MARKDOWN_SPECIAL = "\\`*_{}[]<>#|~!"


def md(text: Any) -> str:
    """``text`` as literal Markdown: on one line, every character Markdown could read as syntax escaped."""
    flat = " ".join(str(text).split())
    return "".join("\\" + ch if ch in MARKDOWN_SPECIAL else ch for ch in flat)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(md(h) for h in header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(md(c) for c in row) + " |" for row in rows]


def _size_rows(report: dict[str, Any]) -> list[list[Any]]:
    """``part, input, output, change`` for each part of the size breakdown (none without one); ``part`` is its
    key in :data:`sparsify.sizes.PARTS`, the sizes ``(bytes, parameters)`` (``("—", "")``: none)."""
    sizes = report.get("sizes") or {}
    before, after = sizes.get("input") or {}, sizes.get("output") or {}
    if not before or not after:
        return []
    rows = []
    for part in [p for p in PARTS if p in before or p in after]:
        b, a = before.get(part, {}), after.get(part, {})
        nb, na = b.get("bytes", 0), a.get("bytes", 0)
        rows.append(
            [
                part,
                (fmt_bytes(nb), fmt_count(b.get("parameters", 0))) if b else ("—", ""),
                (fmt_bytes(na), fmt_count(a.get("parameters", 0))) if a else ("—", ""),
                f"{na / nb:.2f}×" if nb and a else ("new" if a else "removed"),
            ]
        )
    return rows


def _blocks(report: dict[str, Any]) -> list[tuple[str, str, list[str], list[list[str]], set[int]]]:
    """The size by part and the per-record tables as plain text: ``(title, a line above it, header, rows, the
    columns of numbers)``."""
    blocks = []
    if sizes := _size_rows(report):
        rows = [[PART_LABELS[part], *(f"{x[0]} ({x[1]})" if x[1] else x[0] for x in pair), change]
                for part, *pair, change in sizes]  # fmt: skip
        blocks.append(("Size by part", "", ["part", "input", "output", "output / input"], rows, {1, 2, 3}))
    for table, records in _tables(report):
        columns, same = _used_columns(table["columns"], records)
        rows = [[_fmt(r.get(key), fmt) for key, _, fmt in columns] for r in records]
        numbers = {k for k, c in enumerate(columns) if c[2] in ("pct", "err", "s", "shape")}
        above = "every row: " + "; ".join(same) if same else ""
        blocks.append((str(table["title"]), above, [c[1] for c in columns], rows, numbers))
    return blocks


def render_markdown(report: dict[str, Any], baseline: dict[str, Any] | None = None) -> str:
    lines = ["# sparsify report", "", "| | |", "|---|---|"]
    lines += [f"| {md(k)} | {md(v)} |" for k, v in summary_rows(report, baseline)]
    for title, above, header, rows, _ in _blocks(report):
        lines += ["", f"## {md(title)}", "", *([md(above), ""] if above else []), *_md_table(header, rows)]
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {md(n)}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


# The summary rows a terminal shows without --full, in this order ("perplexity @N" rows with "perplexity").
HEADLINE_ROWS = ("model", "output", "passes", "size on disk", "perplexity", "embedding similarity", "KL to input",
                 "quality", "QUALITY", "latency", "wall time", "baseline", "non-zeros vs baseline",
                 "bytes vs baseline")  # fmt: skip


WORST = 10  # the Linears (or layers) with the largest output error a terminal lists


def _text_table(header: list[str] | None, rows: list[Any], right: set[int] | None = None) -> list[str]:
    """Aligned plain-text columns, two spaces apart; the columns in ``right`` (numbers) right-aligned."""
    table = [[" ".join(str(c).split()) for c in row] for row in ([header] if header else []) + list(rows)]
    widths = [max(len(row[k]) for row in table) for k in range(len(table[0]))] if table else []
    return [
        "  ".join(
            c.rjust(w) if k in (right or ()) else c.ljust(w) for k, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in table
    ]


def _worst_records(report: dict[str, Any]) -> list[str]:
    """The :data:`WORST` Linears (or layers) with the largest relative output error, largest first."""
    largest: dict[str, dict[str, Any]] = {}
    for r in report.get("layers") or []:
        name = str(r.get("name"))
        if _is_number(r.get("rel_error")) and r["rel_error"] > largest.get(name, {}).get("rel_error", -math.inf):
            largest[name] = r
    if not largest:
        return []
    worst = sorted(largest.values(), key=lambda r: -r["rel_error"])[:WORST]
    passes = {v["index"]: f"{v['index'] + 1}: {v['description']}" for v in _pass_views(report)}
    many = len(passes) > 1
    rows = [[str(r.get("name")), fmt_sig(r["rel_error"]), *([passes.get(r.get("pass"), "—")] if many else [])]
            for r in worst]  # fmt: skip
    modules = [bool(_module_of(r)) for r in largest.values()]
    what = "Linears" if all(modules) else "modules" if any(modules) else "layers"
    return [
        "",
        f"largest relative output error: {len(worst)} of {len(largest)} {what} (--full: every row of every table)",
        *_text_table([what[:-1], "output error", *(["pass"] if many else [])], rows, {1}),
    ]


def render_text(report: dict[str, Any], full: bool = False, baseline: dict[str, Any] | None = None) -> str:
    """The report for a terminal, as plain text (nothing escaped): the headline (what was done, size, perplexity
    with how it was measured, KL, the quality grade, time) and the Linears with the largest output error;
    ``full``: every summary row, the size by part and every per-record table instead."""
    rows = summary_rows(report, baseline)
    if not full:
        rank = {k: i for i, k in enumerate(HEADLINE_ROWS)}
        rows = [(k, v) for k, v in rows if k.split(" @")[0] in rank]
        rows.sort(key=lambda kv: rank[kv[0].split(" @")[0]])
    lines = _text_table(None, rows)
    if full:
        for title, above, header, table, numbers in _blocks(report):
            lines += ["", title, *([above] if above else []), *_text_table(header, table, numbers)]
    else:
        lines += _worst_records(report)
    lines += [f"note: {' '.join(str(n).split())}" for n in report.get("notes") or []]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- HTML


_e = html.escape


CSS = """
:root{--fg:#1b2230;--muted:#5d6678;--line:#dfe3ea;--bg:#f5f6f8;--card:#fff;--accent:#2b5fad;
--ok:#1a7f37;--okbg:#e7f5ec;--warn:#8a5a00;--warnbg:#fff4d6;--bad:#b42318;--badbg:#fde8e7}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;background:var(--bg);color:var(--fg);
font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1240px;margin:0 auto;padding:28px 32px 48px}
h1{font-size:24px;line-height:1.25;margin:4px 0 6px;overflow-wrap:anywhere}
h2{font-size:19px;margin:0 0 10px}
h3{font-size:15px;margin:18px 0 4px}
p{margin:6px 0}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono",monospace;font-size:.92em}
.muted{color:var(--muted)}
.small{font-size:13px}
.eyebrow{font-size:13px;color:var(--muted);letter-spacing:.02em}
.path{overflow-wrap:anywhere}
.chips{display:flex;flex-wrap:wrap;gap:6px;margin:8px 0 0}
.chip{display:inline-block;white-space:nowrap;border:1px solid var(--line);background:var(--card);border-radius:999px;
padding:1px 10px;font-size:13px}
a.chip{color:inherit;text-decoration:none}a.chip:hover{border-color:var(--accent)}
.chip.ok{background:var(--okbg);border-color:#b7e1c3;color:var(--ok)}
.chip.warning{background:var(--warnbg);border-color:#f0d48a;color:var(--warn)}
.chip.failed{background:var(--badbg);border-color:#f4b4ae;color:var(--bad)}
.banner{border-radius:8px;padding:12px 16px;margin:16px 0;border:1px solid}
.banner.warning{background:var(--warnbg);border-color:#f0d48a;color:#5c3d00}
.banner.failed{background:var(--badbg);border-color:#f4b4ae;color:#7a1a12}
.banner strong{display:block;font-size:16px}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:18px 20px;margin:16px 0}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(210px,1fr));gap:12px;margin:16px 0}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:12px 16px;min-width:0}
.card .label{font-size:13px;color:var(--muted)}
.card .big{font-size:22px;font-weight:600;line-height:1.3;font-variant-numeric:tabular-nums}
.card .big .arrow{color:var(--muted);font-weight:400;padding:0 4px}
.card .sub{font-size:13px;color:var(--muted)}
.arrow{color:var(--muted);padding:0 3px}
td.path{min-width:150px;overflow-wrap:anywhere}
table.cmp{width:100%}table.cmp td{white-space:normal}
td.part i{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px}
.nw{white-space:nowrap}
.tag.proto{background:#eef0f4;color:var(--fg)}
.chart{margin:8px 0 18px}
.chart svg{display:block;width:100%;max-width:560px;height:auto}
.good{color:var(--ok)}.bad{color:var(--bad)}
.scroll{overflow-x:auto;max-width:100%;-webkit-overflow-scrolling:touch}
table{border-collapse:collapse;font-size:13px;font-variant-numeric:tabular-nums}
th,td{border-bottom:1px solid var(--line);padding:4px 10px;text-align:left;vertical-align:top}
th{font-weight:600;background:#fafbfc;white-space:nowrap}
td.num,th.num{text-align:right;white-space:nowrap}
td.part{white-space:nowrap}
td.name{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px;white-space:nowrap}
table.kv th{background:none;font-weight:500;color:var(--muted);width:1%}
table.kv td{overflow-wrap:anywhere}
tr.best td{background:#eef6ee}
.tag{display:inline-block;font-size:11px;font-weight:600;border-radius:4px;padding:0 5px;margin-left:4px;
background:var(--okbg);color:var(--ok);vertical-align:1px}
details{margin:10px 0 0}
summary{cursor:pointer;color:var(--accent);font-size:14px}
.settings{display:flex;flex-wrap:wrap;gap:6px;margin:6px 0 10px}
.settings span{background:#f1f3f7;border-radius:6px;padding:1px 8px;font-size:13px}
.settings b{font-weight:500;color:var(--muted)}
.maps{display:flex;flex-wrap:wrap;gap:8px 28px}
.map{min-width:0;max-width:100%}
.map svg{display:block;max-width:100%;height:auto}
.map.wide svg{max-width:none}
@media (max-width:640px){.map svg{max-width:none}}
svg text{font-family:inherit}
.stack{display:flex;height:22px;border-radius:4px;overflow:hidden;background:#eef0f4}
.stack span{display:block;height:100%}
.stackrow{display:grid;grid-template-columns:64px 1fr 90px;gap:10px;align-items:center;margin:6px 0}
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:13px;margin:8px 0}
.legend i{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:5px;vertical-align:-1px}
.bar{display:inline-block;height:8px;background:var(--accent);border-radius:2px;vertical-align:1px;opacity:.75}
ul{padding-left:20px;margin:6px 0}
li{margin:2px 0}
footer{font-size:12px;color:var(--muted);margin-top:24px}
@media (max-width:640px){
main{padding:14px 12px 32px}
h1{font-size:20px}
section{padding:14px 12px;border-radius:8px}
.cards{grid-template-columns:1fr 1fr;gap:8px}
.card{padding:10px 12px}
.card .big{font-size:18px}
.stackrow{grid-template-columns:52px 1fr 70px;gap:6px}
table.kv th{white-space:normal;min-width:96px}
th,td{padding:4px 6px}
table.sizes th,table.sizes td.part{white-space:normal}
}
td.passes{min-width:180px}
@media (max-width:640px){
table.cmp,table.cmp tbody,table.cmp tr,table.cmp td{display:block;width:100%}
table.cmp tr.head{display:none}
table.cmp tr{border:1px solid var(--line);border-radius:8px;margin:0 0 10px;padding:6px 0}
table.cmp td{border:0;display:flex;justify-content:space-between;gap:12px;text-align:right;white-space:normal;
padding:2px 10px}
table.cmp td::before{content:attr(data-label);color:var(--muted);text-align:left;flex:none}
table.cmp td.path{display:block;text-align:left}
table.cmp td.path::before{content:none}
}
@media (max-width:360px){.cards{grid-template-columns:1fr}}
"""
