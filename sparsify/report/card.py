"""The model card written beside a compressed checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparsify.report.text import md, summary_rows

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
