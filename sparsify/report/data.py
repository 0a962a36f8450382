"""The report's data: built from what the passes recorded, checked against its schema, written and read back."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from sparsify.errors import SparsifyError, shorten

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


def fmt_windows(windows: Any, seq_len: Any) -> str:
    """``16 windows × 512 tokens``: how many windows of how many tokens each (a bare length reads as a total)."""
    return f"{windows} window{'' if windows == 1 else 's'} × {seq_len} tokens"
