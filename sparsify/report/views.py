"""Numbers as the report prints them, and the views every rendering shares (headline, per-pass tables)."""

from __future__ import annotations

import math
import re
from typing import Any

from sparsify.report.data import _ppl_ratio, fmt_windows


def fmt_sig(x: Any, digits: int = 3, pad: bool = True) -> str:
    """A measured number with ``digits`` significant digits: ``0.0757``, ``321``, ``3.00e-6`` (never ``0.0000``
    for a small non-zero value); integers with thousands separators; None as a dash."""
    if x is None:
        return "—"
    if isinstance(x, bool) or not isinstance(x, int | float):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    if x == 0:
        return "0"
    if abs(x) >= 1e-3:
        # trailing zeros kept (pad): 0.00510 lines up with 0.00495 in a column
        text = f"{x:#.{digits}g}".rstrip(".") if pad else f"{x:.{digits}g}"
        return f"{x:,.0f}" if "e" in text else text
    mantissa, exponent = f"{x:.{digits - 1}e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def fmt_pct(x: float | None) -> str:
    """A fraction as a percentage with one decimal; ``<0.1%`` and ``>99.9%`` where rounding would say 0 or 100."""
    if x is None:
        return "—"
    if 0 < abs(x) < 0.0005:
        return "<0.1%" if x > 0 else "−<0.1%"
    if 0.9995 <= x < 1:
        return ">99.9%"
    return f"{x:.1%}"


def fmt_ppl(x: float | None) -> str:
    """A perplexity: one decimal from 100, two from 10, three below (``321.4``, ``12.35``, ``3.142``)."""
    if x is None:
        return "—"
    if not math.isfinite(x):
        return fmt_sig(x)
    return f"{x:,.1f}" if x >= 100 else f"{x:.2f}" if x >= 10 else f"{x:.3f}"


def fmt_count(n: float | None) -> str:
    """A parameter count, short: ``189 k``, ``135 M``, ``1.24 B``."""
    if n is None:
        return "—"
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            return f"{n / size:#.3g}".rstrip(".") + f" {unit}"
    return f"{n:,.0f}"


def fmt_seconds(s: float | None) -> str:
    """A duration, in one format wherever the report shows one: ``250 ms``, ``41.2 s``, ``20 min 54 s``,
    ``2 h 05 min``."""
    if s is None:
        return "—"
    if s < 0.9995e-3:
        return f"{s * 1e6:.3g} µs"
    if s < 0.9995:
        return f"{s * 1e3:.3g} ms"
    if s < 59.95:
        return f"{s:.3g} s"
    whole = round(s)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


# The badge a reader sees beside a perplexity: the ratio after / before, graded; the first grade whose bound the
# ratio does not pass, with the chip's colour. (quality_verdict's status, warning / failed, is the run's own bar.)
QUALITY_GRADES: tuple[tuple[float, str, str], ...] = (
    (1.05, "near lossless", "ok"),
    (1.25, "small loss", "ok"),
    (2.0, "noticeable loss", "warning"),
    (math.inf, "large loss", "failed"),
)


def quality_grade(ratio: float | None) -> tuple[str, str] | None:
    """``(grade, colour)`` for a perplexity ratio after / before (None without one)."""
    if not isinstance(ratio, int | float) or isinstance(ratio, bool) or math.isnan(ratio):
        return None
    return next((label, cls) for bound, label, cls in QUALITY_GRADES if ratio <= bound)


def _fmt(value: Any, fmt: str) -> str:
    """A table cell: ``pct``, ``err`` (significant digits), ``shape`` (a × b), ``s`` (seconds) or plain text."""
    if value is None or value == "":
        return "—"
    if fmt == "pct" and isinstance(value, int | float):
        return fmt_pct(value)
    if fmt == "err" and isinstance(value, int | float):
        return fmt_sig(value)
    if fmt == "shape" and isinstance(value, list | tuple):
        return "×".join(str(v) for v in value)
    if fmt == "s" and isinstance(value, int | float):
        return fmt_seconds(value)
    if isinstance(value, float):
        return fmt_sig(value)
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


# --------------------------------------------------------------------------------------------- data views


def _tables(report: dict[str, Any]) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Each table with its records (reports written before tables were recorded get one generic table)."""
    layers = report.get("layers") or []
    tables = report.get("tables")
    if tables is None:
        keys = [
            k for k in ("name", "method", "pattern", "sparsity", "rel_error", "status") if any(k in r for r in layers)
        ]
        tables = [
            {"kind": None, "title": "layers", "columns": [[k, k, "pct" if k == "sparsity" else "text"] for k in keys]}
        ]
    return [(t, [r for r in layers if t["kind"] is None or r.get("kind") == t["kind"]]) for t in tables]


def _used_columns(columns: list[list[str]], records: list[dict[str, Any]]) -> tuple[list[list[str]], list[str]]:
    """The columns with a value in some row, and ``header value`` for each text column that holds one value in
    every row (said once above the table instead of in each row); the first column always stays."""
    kept, same = [], []
    for i, (key, header, fmt) in enumerate(columns):
        values = [r.get(key) for r in records]
        if all(v is None or v == "" for v in values):
            continue
        texts = {_fmt(v, fmt) for v in values}
        if i and fmt == "text" and len(texts) == 1 and len(records) > 1:
            same.append(f"{header} {texts.pop()}")
            continue
        kept.append([key, header, fmt])
    return kept, same


def _eval_pairs(ev: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The perplexity before/after at each context length measured (none for encoders or without one)."""
    if not ev or ev.get("metric") == "cosine" or "before" not in ev:
        return []
    return [e for e in ev.get("by_length", [ev]) if "before" in e and "after" in e]


def _kl(ev: dict[str, Any]) -> dict[str, Any] | None:
    """The KL of the output's next-token distribution from the input's (``eval.kl``), where measured."""
    kl = ev.get("kl")
    numbers = isinstance(kl, dict) and all(type(kl.get(k)) in (int, float) for k in ("mean", "p99", "top1"))
    return kl if numbers else None


def fmt_kl(kl: dict[str, Any]) -> str:
    """``0.0123 mean, 0.0567 p99, top-1 97.6%``: the KL per token from the input and the top-1 agreement."""
    return f"{fmt_sig(kl['mean'], pad=False)} mean, {fmt_sig(kl['p99'], pad=False)} p99, top-1 {fmt_pct(kl['top1'])}"


def _total(part_sizes: dict[str, Any] | None, key: str) -> int | None:
    if not part_sizes:
        return None
    return sum(int(v.get(key, 0)) for v in part_sizes.values())


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers a reader looks at first, from whichever fields the report has (None where it has not)."""
    t = report.get("totals") or {}
    sizes = report.get("sizes") or {}
    ev = report.get("eval") or {}
    pairs = _eval_pairs(ev)
    quality = report.get("quality") or {}
    params_after = _total(sizes.get("output"), "parameters")
    if params_after is None and t.get("parameters") is not None:
        params_after = t["parameters"] + (t.get("quantized_parameters") or 0)
    latency = report.get("latency") or {}
    ratio = quality.get("ppl_ratio") if _is_number(quality.get("ppl_ratio")) else None
    if ratio is None and pairs:  # older reports: the worst length, as quality_verdict grades
        ratio = max(_ppl_ratio(e) if _is_number(e["before"]) else math.inf for e in pairs)
    return {
        "bytes_before": t.get("input_bytes"),
        "bytes_after": t.get("bytes"),
        "params_before": _total(sizes.get("input"), "parameters"),
        "params_after": params_after,
        "nonzeros": t.get("nonzeros") if not t.get("quantized_parameters") else None,
        "zeros": t.get("overall_sparsity") if not t.get("quantized_parameters") else None,
        "ppl_before": pairs[0]["before"] if pairs else None,
        "ppl_after": pairs[0]["after"] if pairs else None,
        "ppl_len": pairs[0].get("seq_len") if pairs else None,
        "ppl_windows": fmt_windows(pairs[0].get("windows"), pairs[0].get("seq_len")) if pairs else None,
        "ppl_ratio": pairs[0]["after"] / pairs[0]["before"] if pairs and pairs[0]["before"] else None,
        "grade_ratio": ratio,
        "grade": quality_grade(ratio),
        "ppl_before_recovery": ev.get("before_recovery"),
        "kl": _kl(ev),
        "cosine_mean": ev.get("cosine_mean") if ev.get("metric") == "cosine" else None,
        "cosine_min": ev.get("cosine_min") if ev.get("metric") == "cosine" else None,
        "eval_text": ev.get("text"),
        "latency_len": latency.get("seq_len"),
        "latency_before": latency.get("before_s"),
        "latency_after": latency.get("after_s"),
        "quality": quality.get("status"),
        "quality_message": quality.get("message") or "",
        "wall_seconds": t.get("wall_seconds"),
        "peak_rss_bytes": t.get("peak_rss_bytes"),
    }


def _pass_views(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each pass with its kind, settings, records and notes (older reports: inferred from what they hold)."""
    recipe_passes = (report.get("recipe") or {}).get("passes") or []
    listed = report.get("passes") or [
        {"index": i, "type": p.get("type", "?"), "description": p.get("type", "?")} for i, p in enumerate(recipe_passes)
    ]
    layers = report.get("layers") or []
    numbered = any("pass" in r for r in layers)
    notes = report.get("notes") or []
    views = []
    for k, p in enumerate(listed):
        index = p.get("index", k)
        records = [r for r in layers if r.get("pass") == index] if numbered else []
        kind = p.get("kind") or (records[0].get("kind") if records else None) or p.get("type")
        if not numbered:
            same_kind = [q for q in listed if (q.get("kind") or q.get("type")) == kind]
            records = [r for r in layers if r.get("kind", kind) == kind] if len(same_kind) == 1 else []
        settings = p.get("settings")
        if settings is None:
            raw = recipe_passes[index] if index < len(recipe_passes) else {}
            settings = {key: v for key, v in raw.items() if key != "type" and v not in (None, [], {}, False)}
        prefix = f"pass {index}:"
        views.append(
            {
                "index": index,
                "type": p.get("type", "?"),
                "kind": kind,
                "description": p.get("description", p.get("type", "?")),
                "settings": settings,
                "records": records,
                "notes": [n[len(prefix) :].strip() for n in notes if n.startswith(prefix)],
            }
        )
    return views


# ------------------------------------------------------------------------------------------ text summaries


def _module_of(record: dict[str, Any]) -> str | None:
    """The record's module relative to its layer (``self_attn.q_proj``), ``""`` for the layer itself, None when
    the record names no layer."""
    layer, name = record.get("layer"), str(record.get("name", ""))
    if not isinstance(layer, int):
        return None
    m = re.search(rf"(?:^|\.){layer}(?:\.(.+))?$", name)
    return (m.group(1) or "") if m else name


NOT_MEASURED = "not measured"


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
