"""Running a recipe from the command line: options into run settings, the run, its summary on stdout."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from sparsify.cli.app import err_console, out_console
from sparsify.cli_options import Option
from sparsify.errors import SparsifyError


def _eval_path(value: str | None) -> str | None:
    from sparsify.data import BUILTIN_EVAL

    return BUILTIN_EVAL if value in ("heldout", "builtin") else value


def _options(given: dict[str, Any]):
    """The pipeline's run settings from the shared options the user gave."""
    from sparsify.pipeline import Options
    from sparsify.progress import RichProgress

    no_eval = given["no_eval"]
    if no_eval and (given["eval_data"] is not None or given["eval_seq_len"] or given["max_ppl_ratio"] is not None):
        other = next(f for k, f in (("eval_data", "--eval"), ("eval_seq_len", "--eval-seq-len"),
                                    ("max_ppl_ratio", "--max-ppl-ratio")) if given[k])  # fmt: skip
        raise SparsifyError(f"--no-eval skips the perplexity that {other} is about; drop one of them")
    return Options(
        overwrite=given["overwrite"],
        resume=given["resume"],
        device=given["device"],
        revision=given["revision"],
        evaluate=not no_eval,
        eval_data=_eval_path(given["eval_data"]),
        eval_seq_lens=tuple(given["eval_seq_len"]) if given["eval_seq_len"] else None,
        max_ppl_ratio=given["max_ppl_ratio"],
        latency=given["latency"],
        trust_remote_code=given["trust_remote_code"],
        progress=RichProgress(err_console),
    )


def _render(report: dict[str, Any], json_out: bool) -> None:
    from sparsify.report import summary_rows

    if json_out:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    rows = summary_rows(report)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:  # plain lines, never wrapped: a log file reads them as a terminal does
        out_console.print(f"{k:<{width}}  {v}", markup=False, highlight=False)
    for note in report.get("notes", []):
        out_console.print(f"note: {note}", markup=False, highlight=False)


class _FlagError(SparsifyError):
    """A flag's value the recipe refuses: a usage error (exit code 2), like those the parser finds."""


def _run(model: str, data: dict[str, Any], given: dict[str, Any], where: str, names: dict[str, str]) -> None:
    from sparsify.distributed import shutdown
    from sparsify.interrupts import Interrupted
    from sparsify.pipeline import compress
    from sparsify.progress import NoProgress
    from sparsify.recipe import parse_recipe

    try:
        recipe = parse_recipe(data, where, names)
    except SparsifyError as e:
        raise (_FlagError(str(e)) if not where else e) from None
    opts = _options(given)
    output = given["output"]
    world = _world(opts.device)
    opts = dataclasses.replace(opts, world=world, progress=opts.progress if world.leader else NoProgress())
    try:
        report = compress(model, recipe, output, opts)
        if world.leader:  # under torchrun, rank 0 speaks for the run
            _render(report, given["json_out"])
    except Interrupted as e:
        # Wherever the signal landed, the output is this run's if its report carries this run's id.
        if not e.finished and _written_by(output, opts.run_id):
            e.finished = str(output)
        raise
    finally:
        shutdown(world)


def _world(device: str):
    """This process's place in a torchrun job (one of one outside torchrun); ranks but 0 say only errors (all
    of it with --debug)."""
    from sparsify.distributed import from_env

    world = from_env(device)
    logger = logging.getLogger("sparsify")
    if not world.leader and logger.level > logging.DEBUG:
        logger.setLevel(logging.ERROR)
    return world


def _written_by(output: Path, run_id: str) -> bool:
    try:
        return json.loads((Path(output) / "sparsify_report.json").read_text()).get("run_id") == run_id
    except (OSError, ValueError):
        return False


def _names(options: list[Option], step: str | None) -> dict[str, str]:
    """Recipe key paths → the flags that set them, so that a recipe error names what the user typed."""
    out = {}
    for o in options:
        section, key, *sub = o.path
        path = f"{step}.{key}" if section == "pass" else f"{section}.{key}" if section != "recipe" else key
        out[path + (f".{sub[0]}" if sub and sub[0] else "")] = o.flag
    return out
