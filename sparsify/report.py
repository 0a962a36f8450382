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
    version: str,
    model: str,
    output: str,
    model_type: str,
    recipe: Any,
    calibration: dict[str, Any],
    records: list[dict[str, Any]],
    totals: dict[str, Any],
    eval_info: dict[str, Any] | None,
    notes: list[str],
) -> dict[str, Any]:
    pruned = list({r["name"]: r for r in records if r.get("status") == "pruned"}.values())  # last pass per Linear
    target_params = sum(r["shape"][0] * r["shape"][1] for r in pruned)
    target_zeros = sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in pruned)
    return {
        "sparsify_version": version,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": model,
        "output": output,
        "model_type": model_type,
        "recipe": recipe.model_dump(mode="json"),
        "seed": recipe.calibration.seed,
        "calibration": calibration,
        "layers": records,
        "totals": {
            **totals,
            "target_parameters": target_params,
            "target_sparsity": target_zeros / target_params if target_params else 0.0,
            "overall_sparsity": 1 - totals["nonzeros"] / totals["parameters"] if totals.get("parameters") else 0.0,
        },
        "eval": eval_info,
        "notes": notes,
    }


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


def _split(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Linear records (pruning) and layer records (attention patterns)."""
    return [r for r in records if r["method"] != "attention"], [r for r in records if r["method"] == "attention"]


def summary_rows(report: dict[str, Any], baseline: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    t = report["totals"]
    linears, attention = _split(report["layers"])
    rows = [
        ("model", f"{report['model']} ({report['model_type']})"),
        ("output", report["output"]),
        ("passes", "; ".join(_describe_pass(p) for p in report["recipe"]["passes"])),
    ]
    cal = report.get("calibration")
    if cal:
        rows.append(
            ("calibration", f"{cal['windows']} × {cal['seq_len']} tokens of {cal['text']} (seed {report['seed']})")
        )
    if linears:
        rows.append(("target Linears", f"{len({r['name'] for r in linears if r.get('status') == 'pruned'})} pruned"))
        rows.append(("target sparsity", _pct(t["target_sparsity"])))
    if attention:
        changed = [r for r in attention if r["pattern"] != "full"]
        mean = sum(r["flops_fraction"] for r in attention) / len(attention)
        rows.append(
            (
                "attention",
                f"{len(changed)}/{len(attention)} layers {changed[0]['pattern']} ({_shape(changed[0])}),"
                f" {mean:.1%} of dense attention FLOPs at {_flops_at(attention[0])} tokens, {attention[0]['status']}",
            )
        )
    rows += [
        ("parameters", f"{t['parameters']:,} ({t['nonzeros']:,} non-zero, {_pct(t['overall_sparsity'])} zeros)"),
        ("size on disk", _fmt_bytes(t["bytes"])),
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
    if baseline:
        rows.append(
            ("baseline", f"{baseline['path']}: {baseline['parameters']:,} parameters, {_fmt_bytes(baseline['bytes'])}")
        )
        rows.append(("non-zeros vs baseline", f"{t['nonzeros'] / max(baseline['nonzeros'], 1):.3f}×"))
    return rows


def _shape(r: dict[str, Any]) -> str:
    """An attention pattern's size: window and sinks, or block layout."""
    if r.get("block_size"):
        extra = [f"{r[k]} {k.split('_')[0]}" for k in ("global_blocks", "random_blocks") if r.get(k)]
        return f"block {r['block_size']}" + (f", {', '.join(extra)}" if extra else "")
    if r.get("window"):
        return f"window {r['window']}" + (f" + {r['sinks']} sinks" if r.get("sinks") else "")
    return "—"


def _flops_at(r: dict[str, Any]) -> int:
    return int(r.get("flops_at") or 4096)


def _describe_pass(p: dict[str, Any]) -> str:
    if p["type"] == "attention":
        extra = f", 1 in {p['global_every']} layers full" if p.get("global_every") else ""
        return f"attention {p['pattern']} {_shape(p)}{extra}"
    if p["type"] == "prune":
        amount = p["pattern"] if p["pattern"] != "unstructured" else f"{p['sparsity']:.0%} unstructured"
        return f"prune {p['method']} {amount}" + (" (OWL)" if p.get("profile") == "owl" else "")
    return p["type"]


def render_markdown(report: dict[str, Any], baseline: dict[str, Any] | None = None) -> str:
    lines = ["# sparsify report", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary_rows(report, baseline)]
    linears, attention = _split(report["layers"])
    if linears:
        lines += ["", "## Layers", "", "| Linear | shape | method | pattern | sparsity | rel. error | time | status |"]
        lines.append("|---|---|---|---|---|---|---|---|")
        for r in linears:
            lines.append(
                f"| {r['name']} | {r['shape'][0]}×{r['shape'][1]} | {r['method']} | {r['pattern']} | {_pct(r.get('sparsity'))}"
                f" | {_err(r.get('rel_error'))} | {r.get('seconds', 0):.2f} s | {r.get('status', '')} |"
            )
    if attention:
        lines += [
            "",
            "## Attention",
            "",
            f"| layer | pattern | shape | FLOPs vs dense @{_flops_at(attention[0])} | status |",
            "|---|---|---|---|---|",
        ]
        for r in attention:
            lines.append(f"| {r['name']} | {r['pattern']} | {_shape(r)} | {r['flops_fraction']:.1%} | {r['status']} |")
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
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
        + f'<text x="{pad}" y="{height - 10}" font-size="11">Linears in layer order (hover for names)</text></svg>'
    )


def _cells(*values: Any) -> str:
    """One table row, every value escaped."""
    return "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in values) + "</tr>"


def render_html(report: dict[str, Any], baseline: dict[str, Any] | None = None) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in summary_rows(report, baseline)
    )
    layers, attention = _split(report["layers"])
    labels = [r["name"] for r in layers]
    table = "".join(
        _cells(
            r["name"],
            f"{r['shape'][0]}×{r['shape'][1]}",
            r["method"],
            r["pattern"],
            _pct(r.get("sparsity")),
            _err(r.get("rel_error")),
            r.get("status", ""),
        )
        for r in layers
    )
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in report.get("notes", []))
    attn = "".join(
        _cells(r["name"], r["pattern"], _shape(r), f"{r['flops_fraction']:.1%}", r["status"]) for r in attention
    )
    attn_table = (
        "<h2>Attention</h2><table><tr><th>layer</th><th>pattern</th><th>shape</th>"
        f"<th>FLOPs vs dense @{html.escape(str(_flops_at(attention[0])))}</th>"
        f"<th>status</th></tr>{attn}</table>"
        if attention
        else ""
    )
    linear_section = (
        f"""<h2>Per-layer sparsity</h2>{_svg_bars([r.get("sparsity") for r in layers], labels, "sparsity", ".1%")}
<h2>Per-layer reconstruction error</h2>{_svg_bars([r.get("rel_error") for r in layers], labels, "relative output error", ".4f")}
<h2>Layers</h2><table><tr><th>Linear</th><th>shape</th><th>method</th><th>pattern</th><th>sparsity</th>
<th>rel. error</th><th>status</th></tr>{table}</table>"""
        if layers
        else ""
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sparsify report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:left;font-size:13px}}</style></head><body>
<h1>sparsify report</h1><table>{rows}</table>
{linear_section}
{attn_table}
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
    passes = "; ".join(_describe_pass(p) for p in report["recipe"]["passes"])
    loader = "sparsify.load" if any("sparsify.load" in str(r.get("status", "")) for r in report["layers"]) else None
    load = (
        'import sparsify\nmodel = sparsify.load("OUT")  # the attention patterns need sparsify\'s runtime'
        if loader
        else 'from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained("OUT")'
    )
    rows = "\n".join(
        f"| {k} | {v} |" for k, v in summary_rows(report) if k not in ("output", "wall time", "peak memory (RSS)")
    )
    notes = "\n".join(f"- {n}" for n in report.get("notes", []))
    dense_zeros = "prune" in kinds and not any(k in kinds for k in ("quantize", "moe"))
    size_note = (
        "\nPruning sets weights to zero but stores them dense: this checkpoint is as large as the dense one.\n"
        if dense_zeros
        else ""
    )
    return (
        f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n"
        f"# {report['model_type']} compressed with sparsify\n\n"
        f"`{report['model']}` after: {passes}. Made with sparsify {report['sparsify_version']} on"
        f" {report['created'][:10]}; the recipe is in `recipe.yaml`, the full report in `sparsify_report.json`.\n"
        f"{size_note}\n## Load\n\n```python\n{load}\n```\n\n## Measured\n\n| | |\n|---|---|\n{rows}\n"
        + (f"\n## Notes\n\n{notes}\n" if notes else "")
    )
