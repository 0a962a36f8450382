"""sparsify: compress Hugging Face transformer checkpoints into ones the ecosystem loads as-is.

```python
import sparsify

report = sparsify.compress("HuggingFaceTB/SmolLM2-135M", "configs/wanda-50.yaml", "out", eval_data="heldout")
model = sparsify.load("out")
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparsify._version import __version__

__all__ = ["__version__", "compress", "load"]


def compress(model: str | Path, recipe: Any, out: str | Path, **options: Any) -> dict[str, Any]:
    """Run ``recipe`` on ``model`` and write the result to ``out``; returns the report.

    ``model``: a model folder, a Hugging Face Hub repo id or a ``.gguf`` file. ``recipe``: a path to a
    YAML recipe, the recipe as a dict (the YAML's content) or a :class:`sparsify.recipe.Recipe`.
    ``options`` are :class:`sparsify.pipeline.Options` fields: ``overwrite``, ``resume``, ``dtype``
    (``torch.bfloat16`` or ``"bfloat16"``), ``device`` (``"cpu"``, ``"cuda"``, ``"auto"``), ``eval_data``
    (a text file, or ``"heldout"``), ``eval_seq_lens``, ``revision``, ``trust_remote_code``, ...
    """
    import dataclasses

    import torch

    from sparsify.data import BUILTIN_EVAL
    from sparsify.errors import SparsifyError
    from sparsify.pipeline import Options
    from sparsify.pipeline import compress as _compress
    from sparsify.recipe import Recipe, load_recipe, parse_recipe

    if isinstance(recipe, Recipe):
        parsed = recipe
    elif isinstance(recipe, dict):
        parsed = parse_recipe(recipe, "recipe")
    else:
        parsed = load_recipe(recipe)
    known = {f.name for f in dataclasses.fields(Options)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise SparsifyError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if isinstance(options.get("dtype"), str):
        options["dtype"] = getattr(torch, options["dtype"].removeprefix("torch."))
    if options.get("eval_data") in ("heldout", "builtin"):
        options["eval_data"] = BUILTIN_EVAL
    if options.get("eval_seq_lens") is not None:
        options["eval_seq_lens"] = tuple(options["eval_seq_lens"])
    return _compress(model, parsed, out, Options(**options))


def load(path: Any, **kwargs: Any) -> Any:
    """Load a checkpoint sparsify wrote, with its attention patterns active (see :func:`sparsify.loading.load`)."""
    from sparsify.loading import load as _load

    return _load(path, **kwargs)
