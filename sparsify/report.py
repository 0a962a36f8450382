"""The report: built once as plain data, written as JSON, rendered as Markdown or a self-contained HTML page."""

from __future__ import annotations

import datetime as dt
import html
import json
from pathlib import Path
from typing import Any

from sparsify.errors import SparsifyError

REPORT_FILE = "sparsify_report.json"


def build_report(
    *,
    run_id: str,
    version: str,
    loader: str = "transformers",
    model: str,
    output: str,
    model_type: str,
    recipe: Any,
    passes: list[Any],
    calibration: dict[str, Any] | None,
    records: list[dict[str, Any]],
    totals: dict[str, Any],
    eval_info: dict[str, Any] | None,
    notes: list[str],
    quality: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report as plain data. What each kind of pass did comes from its own hooks (``summary``,
    ``columns``): the report renders rows and tables, it never interprets a pass."""
    kinds: dict[str, type] = {}
    for p in passes:
        kinds.setdefault(p.kind, type(p))
    summary: list[list[str]] = []
    facts: dict[str, Any] = {}
    for kind, cls in kinds.items():
        for label, text, key, value in cls.summary([r for r in records if r.get("kind") == kind]):
            if label:
                summary.append([label, text])
            if key is not None:
                facts[key] = value
    tables = [
        {"kind": kind, "title": getattr(cls, "title", kind), "columns": [list(c) for c in cls.columns]}
        for kind, cls in kinds.items()
        if cls.columns and any(r.get("kind") == kind for r in records)
    ]
    return {
        "sparsify_version": version,
        "run_id": run_id,
        "loader": loader,  # what loads the output: transformers, or sparsify.load
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": model,
        "output": output,
        "model_type": model_type,
        "recipe": recipe.model_dump(mode="json"),
        "passes": [{"index": p.index, "type": p.config.type, "description": p.describe()} for p in passes],
        "seed": recipe.calibration.seed,
        "calibration": calibration,
        "summary": summary,
        "tables": tables,
        "layers": records,
        "totals": {
            **totals,
            **facts,
            "overall_sparsity": 1 - totals["nonzeros"] / totals["parameters"] if totals.get("parameters") else 0.0,
        },
        "eval": eval_info,
        "quality": quality,
        "notes": notes,
    }


def quality_verdict(
    eval_info: dict[str, Any] | None, max_ratio: float | None, warn_ratio: float
) -> dict[str, Any] | None:
    """How the perplexity after compares with before: ``ok``, ``warning`` (past ``warn_ratio``) or ``failed``
    (past ``max_ratio``, when one is set), at the worst of the context lengths measured; None without one."""
    import math

    if not eval_info or "before" not in eval_info:
        return None
    pairs = [(e["before"], e["after"], e["seq_len"]) for e in eval_info.get("by_length", [eval_info])]
    ratios = [(a / b if math.isfinite(a) and b > 0 else math.inf, b, a, n) for b, a, n in pairs]
    ratio, before, after, length = max(ratios)
    limit = max_ratio if max_ratio is not None else warn_ratio
    status = "ok" if ratio <= limit else "failed" if max_ratio is not None else "warning"
    what = "the --max-ppl-ratio limit" if max_ratio is not None else "the warning threshold"
    message = (
        f"perplexity {before:.4g} → {after:.4g} at {length} tokens of {eval_info.get('text')}: {ratio:.3g}× the"
        f" input's, past {what} of {limit:g}×; the compression damaged this model badly (see the report; milder"
        " settings keep more)"
    )
    return {"status": status, "ppl_ratio": ratio, "limit": limit, "message": message if status != "ok" else ""}


def write_report(report: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n")


def read_report(folder: Path) -> dict[str, Any]:
    path = Path(folder) / REPORT_FILE if Path(folder).is_dir() else Path(folder)
    if not path.is_file():
        raise SparsifyError(f"no {REPORT_FILE} in {folder}; is it a sparsify output folder?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SparsifyError(f"{path} is not valid JSON: {e}") from None


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.1%}"


def _err(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"


def _fmt(value: Any, fmt: str) -> str:
    """A table cell: ``pct``, ``err`` (4 decimals), ``shape`` (a × b), ``s`` (seconds) or plain text."""
    if value is None:
        return "—"
    if fmt == "pct":
        return _pct(value)
    if fmt == "err":
        return _err(value)
    if fmt == "shape":
        return "×".join(str(v) for v in value)
    if fmt == "s":
        return f"{value:.2f} s"
    return str(value)


def _tables(report: dict[str, Any]) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Each table with its records (reports written before tables were recorded get one generic table)."""
    tables = report.get("tables")
    if tables is None:
        keys = [
            k
            for k in ("name", "method", "pattern", "sparsity", "rel_error", "status")
            if any(k in r for r in report["layers"])
        ]
        tables = [
            {"kind": None, "title": "layers", "columns": [[k, k, "pct" if k == "sparsity" else "text"] for k in keys]}
        ]
    return [(t, [r for r in report["layers"] if t["kind"] is None or r.get("kind") == t["kind"]]) for t in tables]


def summary_rows(report: dict[str, Any], baseline: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    t = report["totals"]
    descriptions = [p["description"] for p in report.get("passes", [])] or [
        p["type"] for p in report["recipe"]["passes"]
    ]
    rows = [
        ("model", f"{report['model']} ({report['model_type']})"),
        ("output", report["output"]),
        ("passes", "; ".join(descriptions)),
    ]
    cal = report.get("calibration")
    if cal:
        rows.append(
            ("calibration", f"{cal['windows']} × {cal['seq_len']} tokens of {cal['text']} (seed {report['seed']})")
        )
    rows += [(label, text) for label, text in report.get("summary", [])]
    rows += [
        (
            "parameters",
            f"{t['parameters']:,} ({t['nonzeros']:,} non-zero, {_pct(t['overall_sparsity'])} zeros)"
            + (
                f" in floating point + {t['quantized_parameters']:,} quantized" if t.get("quantized_parameters") else ""
            ),
        ),
        (
            "size on disk",
            _fmt_bytes(t["bytes"])
            + (
                f" ({t['bytes'] / t['input_bytes']:.3f}× the input's {_fmt_bytes(t['input_bytes'])})"
                if t.get("input_bytes")
                else ""
            ),
        ),
        ("wall time", f"{t['wall_seconds']:.1f} s"),
        ("peak memory (RSS)", _fmt_bytes(t["peak_rss_bytes"])),
    ]
    ev = report.get("eval")
    if ev and ev.get("metric") == "cosine":
        rows.append(
            (
                "embedding similarity",
                f"cosine to dense {ev['cosine_mean']:.4f} mean, {ev['cosine_min']:.4f} min"
                f" ({ev['texts']} paragraphs of {ev['text']}, ≤{ev['seq_len']} tokens, mean-pooled)",
            )
        )
    elif ev:
        for e in ev.get("by_length", [ev]):
            label = "perplexity" if "by_length" not in ev else f"perplexity @{e['seq_len']}"
            rows.append(
                (
                    label,
                    f"{e['before']:.3f} → {e['after']:.3f} ({ev['text']}, {e['windows']} × {e['seq_len']} tokens,"
                    f" stride {e['seq_len']})",
                )
            )
    quality = report.get("quality")
    if quality and quality.get("status") != "ok":
        rows.append(("QUALITY", f"{quality['status'].upper()}: {quality['message']}"))
    if baseline:
        rows.append(
            ("baseline", f"{baseline['path']}: {baseline['parameters']:,} parameters, {_fmt_bytes(baseline['bytes'])}")
        )
        rows.append(("non-zeros vs baseline", f"{t['nonzeros'] / max(baseline['nonzeros'], 1):.3f}×"))
        rows.append(("bytes vs baseline", f"{t['bytes'] / max(baseline['bytes'], 1):.3f}×"))
    return rows


MARKDOWN_SPECIAL = "\\`*_{}[]<>#|~!"


def md(text: Any) -> str:
    """``text`` as literal Markdown: on one line, every character Markdown could read as syntax escaped."""
    flat = " ".join(str(text).split())
    return "".join("\\" + ch if ch in MARKDOWN_SPECIAL else ch for ch in flat)


def render_markdown(report: dict[str, Any], baseline: dict[str, Any] | None = None) -> str:
    lines = ["# sparsify report", "", "| | |", "|---|---|"]
    lines += [f"| {md(k)} | {md(v)} |" for k, v in summary_rows(report, baseline)]
    for table, rows in _tables(report):
        columns = table["columns"]
        lines += ["", f"## {md(table['title'])}", "", "| " + " | ".join(md(c[1]) for c in columns) + " |"]
        lines.append("|" + "---|" * len(columns))
        lines += ["| " + " | ".join(md(_fmt(r.get(c[0]), c[2])) for c in columns) + " |" for r in rows]
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {md(n)}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def _svg_bars(values: list[float | None], labels: list[str], title: str, fmt: str) -> str:
    width, height, pad = 720, 220, 40
    vals = [v or 0.0 for v in values]
    top = max([*vals, 1e-12])
    bar_w = (width - 2 * pad) / max(len(vals), 1)
    bars = []
    for i, (v, label) in enumerate(zip(vals, labels, strict=True)):
        h = (height - 2 * pad) * v / top
        x = pad + i * bar_w
        bars.append(
            f'<rect x="{x:.1f}" y="{height - pad - h:.1f}" width="{max(bar_w - 1, 1):.1f}" height="{h:.1f}" fill="#4c78a8">'
            f"<title>{html.escape(label)}: {format(v, fmt)}</title></rect>"
        )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">'
        f'<text x="{pad}" y="20" font-size="14">{html.escape(title)} (max {format(top, fmt)})</text>'
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#333"/>'
        + "".join(bars)
        + f'<text x="{pad}" y="{height - 10}" font-size="11">rows in order (hover for names)</text></svg>'
    )


def _cells(*values: Any) -> str:
    """One table row, every value escaped."""
    return "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in values) + "</tr>"


def render_html(report: dict[str, Any], baseline: dict[str, Any] | None = None) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in summary_rows(report, baseline)
    )
    sections = []
    for table, records in _tables(report):
        columns = table["columns"]
        labels = [str(r.get("name", "")) for r in records]
        plots = "".join(
            f"<h3>{html.escape(header)}</h3>"
            + _svg_bars([r.get(key) for r in records], labels, header, ".1%" if fmt == "pct" else ".4f")
            for key, header, fmt in columns
            if fmt in ("pct", "err") and any(isinstance(r.get(key), int | float) for r in records)
        )
        head = "".join(f"<th>{html.escape(c[1])}</th>" for c in columns)
        body = "".join(_cells(*(_fmt(r.get(c[0]), c[2]) for c in columns)) for r in records)
        sections.append(f"<h2>{html.escape(str(table['title']))}</h2>{plots}<table><tr>{head}</tr>{body}</table>")
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in report.get("notes", []))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sparsify report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:left;font-size:13px}}</style></head><body>
<h1>sparsify report</h1><table>{rows}</table>
{"".join(sections)}
{"<h2>Notes</h2><ul>" + notes + "</ul>" if notes else ""}
</body></html>
"""


CARD_KEYS = ("license", "license_name", "license_link", "language")


def _dense_card_metadata(card: Path | None) -> dict[str, Any]:
    """The dense model card's licence and languages, to carry over (its text describes another model)."""
    import yaml

    if card is None or not card.is_file():
        return {}
    text = card.read_text(errors="replace")
    if not text.startswith("---"):
        return {}
    try:
        meta = yaml.safe_load(text.split("---", 2)[1])
    except (yaml.YAMLError, IndexError):
        return {}
    return {k: meta[k] for k in CARD_KEYS if k in meta} if isinstance(meta, dict) else {}


def model_card(report: dict[str, Any], dense_card: Path | None = None) -> str:
    """``README.md`` for the output: what was done to which model, and what it measured (from the report)."""
    import yaml

    kinds = sorted({p["type"] for p in report["recipe"]["passes"]})
    base = report["model"]
    meta = {
        **({"base_model": base} if not Path(base).exists() else {}),  # a Hub id, not a local folder
        "library_name": "transformers",
        "tags": ["sparsify", *kinds],
        **_dense_card_metadata(dense_card),
    }
    passes = "; ".join(p["description"] for p in report.get("passes", []))
    loader = report.get("loader") == "sparsify.load"
    load = (
        'import sparsify\nmodel = sparsify.load("OUT")  # the attention patterns need sparsify\'s runtime'
        if loader
        else 'from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained("OUT")'
    )
    rows = "\n".join(
        f"| {md(k)} | {md(v)} |"
        for k, v in summary_rows(report)
        if k not in ("output", "wall time", "peak memory (RSS)")
    )
    notes = "\n".join(f"- {md(n)}" for n in report.get("notes", []))
    return (
        f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n"
        f"# {report['model_type']} compressed with sparsify\n\n"
        f"{md(report['model'])} after: {md(passes)}. Made with sparsify {report['sparsify_version']} on"
        f" {report['created'][:10]}; the recipe is in `recipe.yaml`, the full report in `sparsify_report.json`.\n"
        f"\n## Load\n\n```python\n{load}\n```\n\n## Measured\n\n| | |\n|---|---|\n{rows}\n"
        + (f"\n## Notes\n\n{notes}\n" if notes else "")
    )
