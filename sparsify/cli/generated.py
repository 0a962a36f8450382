"""The commands generated from the registries: one per pass with a ``command`` (its options from the config's
fields, with the follow-up passes' switches), ``compress`` for any recipe, ``export FORMAT`` per output format.
Adding a pass or a format changes nothing here."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from sparsify.cli.app import (
    _MODEL,
    _OUTPUT,
    HELP,
    RUN_OPTIONS,
    DebugOpt,
    JsonOpt,
    VerboseOpt,
    _Command,
    _keyword,
    _recipe_options,
    app,
    err_console,
    out_console,
)
from sparsify.cli.errors import handle_errors
from sparsify.cli.running import _names, _run
from sparsify.cli_options import Option, config_options, values, with_options


def _pass_command(name: str, config_cls: type) -> None:
    """The command ``name`` for the pass of ``config_cls``: its config's fields, the recipe's settings, the shared options,
    and for a compressing layer pass each follow-up pass's switch and fields (``--heal``, ``--heal-steps``: a
    step after it)."""
    options = config_options(config_cls, ("pass",)) + _recipe_options(calibrates=config_cls.layerwise)
    follow = _follow_up_options() if config_cls.layerwise else {}
    pass_type = config_cls.model_fields["type"].default
    run = ["output", *(p for p, _, _ in RUN_OPTIONS)]
    names = {"passes.0": "", **_names(options, "passes.0")}
    extra = [o for opts in follow.values() for o in opts]

    def command(model: str, **given: Any) -> None:
        parts = values(options + extra, given)
        data: dict[str, Any] = {"passes": [{"type": pass_type, **parts["pass"]}], **parts["recipe"]}
        step_names = dict(names)
        for kind, opts in follow.items():
            if (step := parts.get("follow", {}).get(kind)) is not None:
                at = f"passes.{len(data['passes'])}"
                step_names.update({f"{at}.{o.path[2]}" if o.path[2] else at: o.flag for o in opts})
                data["passes"].append({"type": kind, **step})
        if parts["calibration"]:
            data["calibration"] = parts["calibration"]
        _run(model, data, {k: given[k] for k in run}, "", step_names)

    command.__name__ = command.__qualname__ = name.replace("-", "_")
    command.__doc__ = config_cls.command_help
    fn = with_options(command, [_MODEL, _OUTPUT], options + extra, [_keyword(p, a, d) for p, a, d in RUN_OPTIONS])
    app.command(name, epilog=config_cls.command_examples, context_settings=HELP, cls=_Command)(handle_errors(fn))


def _follow_up_options() -> dict[str, list[Option]]:
    """For each pass with a ``follow_up`` text: ``--TYPE`` and ``--TYPE-KEY`` for each field of its config."""
    from pydantic import Field, create_model

    from sparsify.passes import CONFIGS

    out = {}
    for cls in sorted(CONFIGS, key=lambda c: c.whole_model):  # whole-model stages come last
        if cls.follow_up:
            kind = cls.model_fields["type"].default
            switch = create_model(f"_{kind}", **{kind: (cls | None, Field(None, description=cls.follow_up))})
            out[kind] = config_options(switch, ("follow",))
    return out


def _commands() -> None:
    from sparsify.passes import CONFIGS

    for cls in CONFIGS:
        if cls.command:
            _pass_command(cls.command, cls)


_commands()


def _compress(model: str, recipe: Path, **given: Any) -> None:
    """Run a whole recipe: its passes in order, layer by layer."""
    from sparsify.recipe import read_recipe_data

    options = _recipe_options()
    data = read_recipe_data(recipe)
    if isinstance(data, dict):  # anything else is refused by parse_recipe with the file name
        parts = values(options, given)
        data = {**data, **parts["recipe"]}
        if parts["calibration"]:
            data["calibration"] = {**(data.get("calibration") or {}), **parts["calibration"]}
    _run(model, data, {k: given[k] for k in ("output", *(p for p, _, _ in RUN_OPTIONS))}, recipe.name, {})


_RecipeFileOpt = Annotated[
    Path, typer.Option("--recipe", "-r", metavar="RECIPE", help="YAML recipe", show_default=False)
]


_compress_fn = with_options(
    _compress,
    [_MODEL, _OUTPUT, _keyword("recipe", _RecipeFileOpt, ...)],
    _recipe_options(),
    [_keyword(p, a, d) for p, a, d in RUN_OPTIONS],
)


app.command(
    "compress",
    epilog="Example: sparsify compress ./model -r configs/wanda-50.yaml -o ./model-wanda50",
    context_settings=HELP,
    cls=_Command,
)(handle_errors(_compress_fn))  # fmt: skip


# ------------------------------------------------------------------------------------------------- export


_ExportOutputOpt = Annotated[
    Path,
    typer.Option(
        "--output", "-o", metavar="FILE", show_default=False, help="file to write (appears only when complete)"
    ),
]


_EXPORT_RUN = [
    ("overwrite", Annotated[bool, typer.Option("--overwrite", help="replace an existing file")], False),
    ("json_out", JsonOpt, False),
    ("verbose", VerboseOpt, False),
    ("debug", DebugOpt, False),
]


def _export_command(group: typer.Typer, fmt: Any) -> None:
    """``sparsify export <format>`` for one entry of :data:`sparsify.export.FORMATS`: its config's fields."""
    options = config_options(fmt.config, ("export",))
    output = inspect.Parameter("output", inspect.Parameter.KEYWORD_ONLY, annotation=_ExportOutputOpt)

    def command(model: str, **given: Any) -> None:
        from sparsify.export import export
        from sparsify.interrupts import Interrupted
        from sparsify.progress import RichProgress

        config = values(options, given).get("export", {})
        summary = export(model, given["output"], fmt.name, overwrite=given["overwrite"],
                         progress=RichProgress(err_console), **config)  # fmt: skip
        try:
            _render_export(summary, given["json_out"])
        except Interrupted as e:  # the file is written
            e.finished = summary["path"]
            raise

    command.__name__ = command.__qualname__ = f"export_{fmt.name}"
    command.__doc__ = fmt.help
    fn = with_options(command, [_MODEL, output], options, [_keyword(p, a, d) for p, a, d in _EXPORT_RUN])
    group.command(fmt.name, epilog=fmt.examples, context_settings=HELP, cls=_Command)(handle_errors(fn))


def _render_export(summary: dict[str, Any], json_out: bool) -> None:
    if json_out:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        return
    types = ", ".join(f"{n} {k}" for k, n in summary["types"].items())
    line = f"wrote {summary['path']} ({summary['bytes'] / 1e6:.1f} MB, {summary['tensors']} tensors: {types})"
    for text in (line, *summary.get("details", ()), *(f"note: {n}" for n in summary["notes"])):
        out_console.print(text, markup=False, highlight=False)


def _export_group() -> None:
    from sparsify.export import FORMATS

    group = typer.Typer(help="Write a model in another runtime's format.", no_args_is_help=True,
                        rich_markup_mode=None, context_settings=HELP)  # fmt: skip
    for fmt in FORMATS.values():
        _export_command(group, fmt)
    app.add_typer(group, name="export")


_export_group()


# ------------------------------------------------------------------------------------------------- the rest
