"""Orchestration: model folder + recipe → compressed folder + report. One code path for every command.

```
compress(model, recipe, out)
  check OUT, claim its work folder (locked)
  plan: the whole recipe walked on the config alone (sparsify.plan): refused here, or every step applies
  input: every tensor checked against the config, and finite
  calibration windows; held-out windows for the perplexity before and after
  stage by stage: config passes, prepare (whole-model decisions, saved), the layer-wise sweep, config edits;
    or a whole-model pass (distillation) on the model the stages before wrote
  the output: shards, config, tokenizer, recipe.yaml; checked (config vs tensors, transformers' loader,
  finite logits); perplexity after; report and model card; renamed into place
```

The modules, in the order they import each other: ``options`` (run settings, what is decided before work) →
``layers`` (whole-model decisions, the in-memory API) → ``prepare`` (plan, calibration, checks) → ``measure``
(perplexity, KL, latency) → ``probe`` (the model before a recovery pass) → ``stages`` (one stage: prepare,
sweep, assemble) → ``conclude`` (files, report) → ``flow`` (:func:`compress`, the one code path).
"""

from __future__ import annotations

from sparsify.pipeline.flow import compress
from sparsify.pipeline.layers import compress_model
from sparsify.pipeline.options import WARN_PPL_RATIO, Options, QualityError

__all__ = ["WARN_PPL_RATIO", "Options", "QualityError", "compress", "compress_model"]
