"""The recipe: a YAML document validated by pydantic; unknown keys fail with their key path.

```yaml
calibration: {samples: 128, seq_len: 512, seed: 0}      # data: optional path
passes:
  - type: prune
    method: sparsegpt
    pattern: "2:4"
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError

from sparsify.errors import SparsifyError, shorten
from sparsify.expert_modes import ExpertCalibration, ExpertMode
from sparsify.passes import CONFIGS, calibrates
from sparsify.passes.base import StrictModel

PassUnion = Annotated[Union[CONFIGS], Field(discriminator="type")] if len(CONFIGS) > 1 else CONFIGS[0]  # noqa: UP007


class Calibration(StrictModel):
    data: str | None = Field(
        None,
        description=".txt, .json/.jsonl/.parquet/.csv records, a folder of them, or a datasets save_to_disk folder;"
        " 'none': no data [default: embedded Python docs]",
        json_schema_extra={"flag": "--calib"},
    )
    text_column: str | None = Field(None, description="column of records to use; default 'text', else chat 'messages'")
    # bounds far past any real run, so that a typo gives one line and not an int64 overflow inside torch (whether
    # the windows fit in memory is checked before any work, against this machine's)
    samples: int = Field(128, gt=0, le=2**40, description="number of calibration windows")
    seq_len: int = Field(512, gt=0, le=2**31, description="tokens per window")
    seed: int = Field(0, ge=-(2**63), lt=2**63, description="seed for window sampling")
    batch_size: int = Field(8, gt=0, le=2**40, description="windows per forward")
    inputs: Literal["compressed", "dense"] = Field(
        "compressed",
        description="what each layer is calibrated on: compressed = the outputs of the compressed layers before it"
        " (sequential: each layer also corrects what those got wrong; two forwards of each layer); dense = the dense"
        " model's hidden states (one forward of each layer: faster)",
    )
    expert_calibration: ExpertMode = Field(
        "fill",
        description="MoE: what each routed expert is calibrated on: fill = the tokens routed to it, and all of its"
        " layer's tokens where it was routed fewer than --expert-min-tokens; all = every token of its layer; routed ="
        " only the tokens routed to it (an expert routed none is compressed without calibration)",
    )
    expert_min_tokens: int = Field(
        256, gt=0, le=2**40, description="fill: routed tokens below which an expert also sees its layer's other tokens"
    )

    def inapplicable(self) -> dict[str, str]:
        if self.expert_calibration == "fill":
            return {}
        return {"expert_min_tokens": "applies with expert_calibration: fill"}

    @property
    def experts(self) -> ExpertCalibration:
        return ExpertCalibration(self.expert_calibration, self.expert_min_tokens)


class Recipe(StrictModel):
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="compute dtype of calibration and the maths (the output keeps the input's dtypes)"
    )
    calibration: Calibration = Calibration()
    passes: list[PassUnion] = Field(min_length=1)  # type: ignore[valid-type]

    def inapplicable(self) -> dict[str, str]:
        if any(calibrates(p) for p in self.passes):
            return {}
        return {"calibration": "applies to recipes that calibrate: these passes only rewrite the config"}

    def to_yaml(self) -> str:
        """The recipe as it ran: every key that applies, defaults spelled out; it reads back as the same recipe."""
        return yaml.safe_dump(self.dump(), sort_keys=False)


def format_validation_error(e: ValidationError, where: str, names: dict[str, str] | None = None) -> str:
    """One line: ``where: key.path: message (got value)`` for each problem. ``names`` maps key paths to what the
    user typed (``passes.0.sparsity`` → ``--sparsity``): a known path is shown as that name alone, and a
    message about a combination that starts with a key names it so too."""
    names = names or {}
    parts = []
    tags = {c.model_fields["type"].default for c in CONFIGS}
    for err in e.errors():
        raw = err["loc"]
        # Drop pydantic's union tag ("passes.0.prune.x" -> "passes.0.x") and validator wrappers.
        kept = [x for i, x in enumerate(raw) if not (x in tags and i and isinstance(raw[i - 1], int))]
        loc = ".".join(str(x) for x in kept if not str(x).startswith("function-after"))
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        shown = "" if isinstance(got, dict) or err["type"] == "missing" else f" (got {shorten(got)})"
        first, _, rest = msg.partition(" ")
        if f"{loc}.{first}" in names:  # "observer sets ..." about passes.0, told as "--observer sets ..."
            parts.append(f"{names[f'{loc}.{first}']} {rest}{shown}")
        else:
            label = names.get(loc, loc or "<root>")
            parts.append(f"{label}: {msg}{shown}" if label else f"{msg}{shown}")
    more = f"; and {len(parts) - 3} more problems" if len(parts) > 3 else ""
    return (f"{where}: " if where else "") + "; ".join(parts[:3]) + more


def parse_recipe(data: Any, where: str = "recipe", names: dict[str, str] | None = None) -> Recipe:
    """The recipe ``data`` describes; ``where`` (a file name, or "" for flags) and ``names`` (key path → flag)
    say in its errors what the user wrote."""
    if not isinstance(data, dict):
        raise SparsifyError(f"{where}: expected a mapping with 'passes', got {type(data).__name__}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise SparsifyError(format_validation_error(e, where, names)) from None
    if (found := _past_int64(recipe.model_dump())) is not None:
        loc, value = found
        raise SparsifyError(
            (f"{where}: " if where else "")
            + f"{(names or {}).get(loc, loc)}: {shorten(value)} is out of range (integers from -2**63 to 2**63 - 1)"
        )
    return recipe


INT64 = 2**63  # every integer of a recipe fits in torch's int64 (a larger one would overflow inside torch)


def _past_int64(data: Any, path: tuple[str, ...] = ()) -> tuple[str, int] | None:
    """The key path and value of the first integer in ``data`` outside int64, if any."""
    if isinstance(data, int) and not isinstance(data, bool):
        return (".".join(path), data) if not -INT64 <= data < INT64 else None
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list | tuple) else ()
    for key, value in items:
        if (found := _past_int64(value, (*path, str(key)))) is not None:
            return found
    return None


MAX_RECIPE_NODES = 100_000  # values in a recipe once YAML aliases are expanded (real recipes have dozens)


def read_recipe_data(path: str | Path) -> Any:
    """The recipe file's YAML, unvalidated (callers may apply overrides before :func:`parse_recipe`)."""
    p = Path(path)
    if not p.is_file():
        raise SparsifyError(f"recipe not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SparsifyError(f"{p.name}: invalid YAML{at}: {getattr(e, 'problem', e)}") from None
    if _expanded_size(data, MAX_RECIPE_NODES) > MAX_RECIPE_NODES:
        raise SparsifyError(
            f"{p.name}: more than {MAX_RECIPE_NODES:,} values once its YAML aliases are expanded; a recipe is a few"
            " dozen (an alias bomb?)"
        )
    return data


def _expanded_size(data: Any, limit: int) -> int:
    """How many values ``data`` holds with shared (aliased) parts counted each time they appear, up to ``limit + 1``."""
    count, stack = 0, [data]
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return count


def load_recipe(path: str | Path) -> Recipe:
    return parse_recipe(read_recipe_data(path), Path(path).name)
