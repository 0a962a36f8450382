"""Everything a registry holds is reachable, documented, exemplified and tested.

- every registered pass: a CLI command (or, without one, a recipe ``type``), a docs page with ``type: NAME``,
  an example recipe in ``configs/`` using it (every example recipe parses);
- every registered method, scheme and structured kind: accepted by its config (any case), offered by its CLI
  command as a choice, documented as ``key: NAME`` or ``--key NAME``, and named in the round-trip test that
  compresses with it, reloads the output and compares it with the model compressed in memory;
- every output format of ``sparsify.export``: documented and named in a test; every GGUF ``--type``: documented,
  its blocks tested;
- every equalizer (SmoothQuant, AWQ): a quantize key and flag, documented, in a round-trip case;
- docs/contributing.md's files exist.

Adding a method is then: its maths in ``sparsify/algorithms``, one registry entry, a docs line and a
round-trip case; this file says which of those is missing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from sparsify.cli import app
from sparsify.passes import PASSES
from sparsify.passes.equalizers import EQUALIZERS
from sparsify.passes.prune_config import PruneConfig
from sparsify.passes.prune_methods import PRUNE_METHODS, STRUCTURED
from sparsify.passes.quantize import QuantizeConfig
from sparsify.passes.quantize_methods import QUANTIZE_METHODS, SCHEMES
from sparsify.recipe import load_recipe, parse_recipe
from tests import test_families, test_quantize, test_structured

ROOT = Path(__file__).parent.parent
EXAMPLES = sorted((ROOT / "configs").glob("*.yaml"))
DOCS = [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]
METHOD_DOCS = [*sorted((ROOT / "docs" / "methods").glob("*.md")), ROOT / "docs" / "recipe.md", ROOT / "README.md"]


def _text(paths: list[Path]) -> str:
    return "\n".join(p.read_text() for p in paths)


def _commands() -> dict[str, Any]:
    return typer.main.get_command(app).commands  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------- passes


@pytest.mark.parametrize("name", list(PASSES))
def test_every_pass_has_a_command_or_is_a_recipe_type(name):
    cls = PASSES[name]
    assert cls.config_cls.model_fields["type"].default == name  # the recipe `type` that selects it
    if cls.config_cls.command is not None:
        assert cls.config_cls.command in _commands(), f"pass {name}: no CLI command {cls.config_cls.command!r}"


@pytest.mark.parametrize("name", list(PASSES))
def test_every_pass_has_a_docs_page(name):
    pages = [p for p in DOCS if re.search(rf"type: *{re.escape(name)}\b", p.read_text())]
    assert pages, f"pass {name}: no page under docs/ shows `type: {name}`"


@pytest.mark.parametrize("name", list(PASSES))
def test_every_pass_has_an_example_recipe(name):
    using = [p.name for p in EXAMPLES if any(step.type == name for step in load_recipe(p).passes)]
    assert using, f"pass {name}: no recipe in configs/ uses it"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_recipe_parses(path):
    assert load_recipe(path).passes


# ------------------------------------------------------------------------------------------ methods


@dataclass(frozen=True)
class Choice:
    """One registry of names and everything that must know them."""

    registry: dict[str, Any]
    config: type
    key: str  # the config field (and YAML key) that names an entry
    command: str  # the CLI command whose --KEY offers them
    step: Callable[[str], dict[str, Any]]  # a valid recipe step naming an entry
    round_trips: Callable[[], set[str]]  # the entries the round-trip tests compress with


def _quantize_methods_compressed() -> set[str]:
    default = QuantizeConfig.model_fields["method"].default
    return {extra.get("method", default) for _, extra in test_quantize.SCHEMES}


def _structured_step(kind: str) -> dict[str, Any]:
    return {"type": "prune", "structured": kind, **({"remove": 1} if kind.lower() == "layers" else {"ratio": 0.25})}


CHOICES = {
    "prune method": Choice(
        PRUNE_METHODS, PruneConfig, "method", "prune",
        lambda m: {"type": "prune", "method": m, "sparsity": 0.5},
        lambda: set(test_families.METHODS),
    ),
    "structured kind": Choice(
        STRUCTURED, PruneConfig, "structured", "prune", _structured_step,
        lambda: {what for _, what in test_structured.CASES},
    ),
    "quantize method": Choice(
        QUANTIZE_METHODS, QuantizeConfig, "method", "quantize",
        lambda m: {"type": "quantize", "scheme": "w4a16", "method": m},
        _quantize_methods_compressed,
    ),
    "quantize scheme": Choice(
        SCHEMES, QuantizeConfig, "scheme", "quantize",
        lambda s: {"type": "quantize", "scheme": s},
        lambda: {scheme for scheme, _ in test_quantize.SCHEMES},
    ),
}  # fmt: skip
ENTRIES = [(kind, name) for kind, choice in CHOICES.items() for name in choice.registry]


@pytest.mark.parametrize(("kind", "name"), ENTRIES)
def test_every_method_is_accepted_by_its_config_in_any_case(kind, name):
    choice = CHOICES[kind]
    step = choice.step(name.upper())
    parsed = parse_recipe({"passes": [step]}).passes[0]
    assert isinstance(parsed, choice.config) and getattr(parsed, choice.key) == name


@pytest.mark.parametrize(("kind", "name"), ENTRIES)
def test_every_method_is_a_cli_choice(kind, name, tmp_path):
    """The command takes it, in any case: the run gets past its options and its recipe to the missing model."""
    choice = CHOICES[kind]
    flags = [a for k, v in choice.step(name.upper()).items() if k != "type" for a in (f"--{k.replace('_', '-')}", v)]
    args = [choice.command, tmp_path / "missing", "-o", tmp_path / "out", *flags]
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 1 and "model not found" in r.output, r.output


@pytest.mark.parametrize(("kind", "name"), ENTRIES)
def test_every_method_is_documented(kind, name):
    key = CHOICES[kind].key
    pattern = rf"(\b{key}: *|--{key}[ =]){re.escape(name)}(?![\w-])"
    assert re.search(pattern, _text(METHOD_DOCS)), f"{kind} {name}: docs/methods never show `{key}: {name}`"


@pytest.mark.parametrize(("kind", "name"), ENTRIES)
def test_every_method_has_a_round_trip_test(kind, name):
    assert name in CHOICES[kind].round_trips(), f"{kind} {name}: no round-trip test compresses with it"


# ------------------------------------------------------------------------------------ output formats


def test_every_output_format_is_documented_and_tested():
    from sparsify.export import FORMATS

    docs = _text(DOCS)
    tests = _text([p for p in sorted(Path(__file__).parent.glob("test_*.py")) if p.name != Path(__file__).name])
    for name in FORMATS:
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", docs, re.IGNORECASE), f"format {name}: no docs"
        assert f'"{name}"' in tests, f"format {name}: no test names it"


def _gguf_types() -> list[str]:
    from typing import get_args

    from sparsify.export import GgufConfig

    return [t for t in get_args(GgufConfig.model_fields["tensor_type"].annotation) if t != "auto"]


@pytest.mark.parametrize("name", _gguf_types())
def test_every_gguf_type_is_documented_and_its_blocks_tested(name):
    """Each ``export gguf --type``: shown in docs/export.md, and its blocks tested against gguf-py's dequantizer
    (K types: tests/test_kquants.py; legacy: tests/test_legacy_quants.py; IQ4: tests/test_iq4.py; floats: written and
    read back)."""
    from tests import test_iq4, test_kquants, test_legacy_quants

    export_doc = (ROOT / "docs" / "export.md").read_text()
    assert re.search(rf"--type [\w|]*(?<![\w-]){re.escape(name)}(?![\w-])", export_doc), f"--type {name}: no docs"
    from sparsify.export.mixes import MIXES, TYPE_RULES, Facts

    blocks = {*test_kquants.TYPES, *test_legacy_quants.LEGACY, *test_iq4.TYPES, "f32", "f16", "bf16"}
    # a named mix, or a type with llama-quantize's rules: each type it gives is one of the above
    # (tests/test_gguf_mixes.py: which where)
    base, rules = (MIXES[name].base, MIXES[name].rules) if name in MIXES else (name, TYPE_RULES.get(name, {}))
    facts = [Facts(i, n, gqa, im) for n in range(1, 65) for i in range(n) for gqa in (1, 4) for im in (False, True)]
    given = {base, *(("q6_k",) if name in MIXES else ())} | {r(f) or base for r in rules.values() for f in facts}
    assert given <= blocks, f"--type {name}: no test checks the blocks of {sorted(given - blocks)}"


def test_contributing_names_files_that_exist():
    """docs/contributing.md's lists point at real files (a moved file fails here, not in a newcomer's hands)."""
    text = (ROOT / "docs" / "contributing.md").read_text()
    paths = set(re.findall(r"`((?:sparsify|tests|docs|configs|benchmarks)/[\w/.\-]+\.(?:py|md|yaml))`", text))
    assert len(paths) > 10
    missing = sorted(p for p in paths if not (ROOT / p).exists() and not Path(p).stem.startswith("name"))  # a template
    assert not missing, missing


# ---------------------------------------------------------------------------------------- equalizers


@pytest.mark.parametrize("name", list(EQUALIZERS))
def test_every_equalizer_is_a_quantize_key_a_flag_documented_and_round_tripped(name):
    """An equalizer's name is the quantize config key that turns it on (``smoothquant: 0.5``, ``awq: {}``)."""
    assert name in QuantizeConfig.model_fields, f"equalizer {name}: no quantize config key {name!r}"
    r = CliRunner().invoke(app, ["quantize", "-h"], terminal_width=200)
    assert f"--{name}" in r.output, f"equalizer {name}: no --{name} on sparsify quantize"
    assert re.search(rf"(\b{name}: |--{name}\b)", _text(METHOD_DOCS)), f"equalizer {name}: docs/methods never show it"
    assert any(name in extra for _, extra in test_quantize.SCHEMES), f"equalizer {name}: no round-trip case"
