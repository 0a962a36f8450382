"""The report: built once as plain data, written as JSON, rendered as Markdown or a self-contained HTML page."""

from __future__ import annotations

import datetime as dt
import html
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from sparsify.errors import SparsifyError, shorten
from sparsify.sizes import PART_LABELS, PARTS, fmt_bytes

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
    sizes: dict[str, Any] | None = None,
    latency: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report as plain data. What each kind of pass did comes from its own hooks (``summary``,
    ``columns``): the report renders rows and tables, it never interprets a pass.

    ``sizes``: ``{"input": {part: {"bytes", "parameters"}}, "output": {...}}`` (:func:`sparsify.sizes.source_sizes`);
    ``latency``: ``{"seq_len": int, "before_s": float, "after_s": float}``, a forward pass measured before and after.
    Both optional: the report is rendered without them.
    """
    kinds: dict[str, type] = {}
    for p in passes:
        kinds.setdefault(p.kind, type(p))
    summary: list[list[str]] = []
    summary_by_kind: dict[str, list[list[str]]] = {}
    facts: dict[str, Any] = {}
    for kind, cls in kinds.items():
        for label, text, key, value in cls.summary([r for r in records if r.get("kind") == kind]):
            if label:
                summary.append([label, text])
                summary_by_kind.setdefault(kind, []).append([label, text])
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
        "passes": [
            {
                "index": p.index,
                "type": p.config.type,
                "kind": p.kind,
                "description": p.describe(),
                "settings": {k: v for k, v in p.config.dump().items() if k != "type"},  # the keys that apply
            }
            for p in passes
        ],
        "seed": recipe.calibration.seed,
        "calibration": calibration,
        "summary": summary,
        "summary_by_kind": summary_by_kind,
        "tables": tables,
        "layers": records,
        "totals": {
            **totals,
            **facts,
            "overall_sparsity": 1 - totals["nonzeros"] / totals["parameters"] if totals.get("parameters") else 0.0,
        },
        "eval": eval_info,
        "quality": quality,
        **({"sizes": sizes} if sizes else {}),
        **({"latency": latency} if latency else {}),
        "notes": notes,
    }


def quality_verdict(
    eval_info: dict[str, Any] | None, max_ratio: float | None, warn_ratio: float
) -> dict[str, Any] | None:
    """How the perplexity after compares with before: ``ok``, ``warning`` (past ``warn_ratio``) or ``failed``
    (past ``max_ratio``, when one is set), at the worst of the context lengths measured; None without one."""
    if not eval_info or "before" not in eval_info:
        return None
    e = max(eval_info.get("by_length", [eval_info]), key=_ppl_ratio)
    ratio = _ppl_ratio(e)
    limit = max_ratio if max_ratio is not None else warn_ratio
    status = "ok" if ratio <= limit else "failed" if max_ratio is not None else "warning"
    what = "the --max-ppl-ratio limit" if max_ratio is not None else "the warning threshold"
    message = (
        f"perplexity {e['before']:.4g} → {e['after']:.4g} on {eval_info.get('text')},"
        f" {fmt_windows(e.get('windows', eval_info.get('windows')), e['seq_len'])}: {ratio:.3g}× the"
        f" input's, past {what} of {limit:g}×; the compression damaged this model badly (see the report; milder"
        " settings keep more)"
    )
    return {"status": status, "ppl_ratio": ratio, "limit": limit, "message": message if status != "ok" else ""}


def _ppl_ratio(e: dict[str, Any]) -> float:
    """Perplexity after / before at one length (infinite when the output's is not finite)."""
    return e["after"] / e["before"] if math.isfinite(e["after"]) and e["before"] > 0 else math.inf


def write_report(report: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n")


def read_report(folder: Path) -> dict[str, Any]:
    """The report in ``folder`` (or the file itself), its types checked: a report that is not JSON, or whose
    fields the renderers read have the wrong type or are missing, is refused in one line naming the field."""
    path = Path(folder) / REPORT_FILE if Path(folder).is_dir() else Path(folder)
    if not path.is_file():
        raise SparsifyError(f"no {REPORT_FILE} in {folder}; is it a sparsify output folder?")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SparsifyError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise SparsifyError(f"{path} must be a JSON object, got {_TYPE_NAMES.get(type(data), type(data).__name__)}")
    try:
        _Report.model_validate(data)
    except ValidationError as e:
        raise SparsifyError(f"{path}: {_report_problems(e)}") from None
    return data


# ------------------------------------------------------------------------------------- the report's schema
# The fields the renderers read, with their types; every other key is kept as it is (older and newer reports).
# Checked on read only: the dict itself is rendered, nothing is filled in.


class _Schema(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    def _needs(self, *keys: str) -> None:
        """``keys`` must be present (a field that is required only with another's value)."""
        for key in keys:
            if getattr(self, key) is None:
                raise PydanticCustomError("missing_key", "{key} is missing", {"key": key})


_Pair = Annotated[list[Any], Field(min_length=2, max_length=2)]  # [label, text]


class _RecipePass(_Schema):
    type: str


class _Recipe(_Schema):
    passes: list[_RecipePass] = []


class _Pass(_Schema):
    description: str
    index: int | None = None
    type: str | None = None
    kind: str | None = None
    settings: dict[str, Any] | None = None


class _Calibration(_Schema):
    text: str | None
    windows: int
    seq_len: int
    why: str | None = None


class _Table(_Schema):
    kind: str | None
    title: str
    columns: list[Annotated[list[str], Field(min_length=3, max_length=3)]]  # [key, header, format]


class _Totals(_Schema):
    parameters: int | None = None
    nonzeros: int | None = None
    quantized_parameters: int | None = None
    overall_sparsity: float | None = None
    bytes: int | None = None
    input_bytes: int | None = None
    wall_seconds: float | None = None
    peak_rss_bytes: int | None = None

    @model_validator(mode="after")
    def _counts(self) -> _Totals:
        if self.parameters is not None:
            self._needs("nonzeros")
        return self


class _Length(_Schema):
    """Perplexity before and after at one context length."""

    before: float | None = None
    after: float | None = None
    seq_len: int | None = None
    windows: int | None = None

    @model_validator(mode="after")
    def _pair(self) -> _Length:
        if self.before is not None and self.after is not None:
            self._needs("seq_len", "windows")
        return self


class _Recovery(_Schema):
    perplexity: float
    step: str


class _Eval(_Length):
    metric: str | None = None
    text: str | None = None
    by_length: list[_Length] | None = None
    before_recovery: _Recovery | None = None
    cosine_mean: float | None = None
    cosine_min: float | None = None
    texts: int | None = None

    @model_validator(mode="after")
    def _cosine(self) -> _Eval:
        if self.metric == "cosine":
            self._needs("cosine_mean", "cosine_min", "texts", "seq_len")
        return self


class _Quality(_Schema):
    status: str
    message: str
    ppl_ratio: float | None = None


class _Size(_Schema):
    bytes: int
    parameters: int | None = None


class _Sizes(_Schema):
    input: dict[str, _Size] | None = None
    output: dict[str, _Size] | None = None


class _Latency(_Schema):
    seq_len: int | None = None
    before_s: float | None = None
    after_s: float | None = None


class _Report(_Schema):
    model: str
    output: str
    model_type: str
    recipe: _Recipe | None = None
    passes: list[_Pass] = []
    calibration: _Calibration | None = None
    summary: list[_Pair] = []
    summary_by_kind: dict[str, list[_Pair]] | None = None
    tables: list[_Table] | None = None
    layers: list[dict[str, Any]] | None = None
    totals: _Totals | None = None
    eval: _Eval | None = None
    quality: _Quality | None = None
    sizes: _Sizes | None = None
    latency: _Latency | None = None
    notes: list[str] = []

    @model_validator(mode="after")
    def _described(self) -> _Report:
        if not self.passes and (self.recipe is None or not self.recipe.passes):
            raise PydanticCustomError("missing_key", "{key} is missing", {"key": "passes"})
        return self


_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
               bool: "true or false", type(None): "null"}  # fmt: skip
_EXPECTED = {"int_type": "an integer", "float_type": "a number", "string_type": "a string", "bool_type": "true or false",
             "dict_type": "an object", "model_type": "an object", "list_type": "a list"}  # fmt: skip


def _report_problems(e: ValidationError) -> str:
    """``eval.seq_len must be an integer, got '<svg …'; ...``: each problem with the field's path in the JSON."""
    parts = []
    for err in e.errors():
        loc = [str(x) for x in err["loc"]]
        kind, ctx = err["type"], err.get("ctx") or {}
        if kind == "missing_key":
            loc.append(str(ctx["key"]))
        where = ".".join(loc) or "the report"
        if kind in ("missing", "missing_key"):
            parts.append(f"{where} is missing")
        elif kind in ("too_short", "too_long"):
            parts.append(f"{where} must be a list of {ctx.get('min_length', ctx.get('max_length'))} items")
        else:
            expected = _EXPECTED.get(kind, err["msg"].lower())
            parts.append(f"{where} must be {expected}, got {shorten(err.get('input'))}")
    more = f"; and {len(parts) - 3} more problems" if len(parts) > 3 else ""
    return "; ".join(parts[:3]) + more


# ------------------------------------------------------------------------------------------------ numbers


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


def fmt_windows(windows: Any, seq_len: Any) -> str:
    """``16 windows × 512 tokens``: how many windows of how many tokens each (a bare length reads as a total)."""
    return f"{windows} window{'' if windows == 1 else 's'} × {seq_len} tokens"


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


def _module_of(record: dict[str, Any]) -> str | None:
    """The record's module relative to its layer (``self_attn.q_proj``), ``""`` for the layer itself, None when
    the record names no layer."""
    layer, name = record.get("layer"), str(record.get("name", ""))
    if not isinstance(layer, int):
        return None
    m = re.search(rf"(?:^|\.){layer}(?:\.(.+))?$", name)
    return (m.group(1) or "") if m else name


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
NOT_MEASURED = "not measured"


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


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
