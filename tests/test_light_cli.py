"""The CLI's help, its version and a recipe's validation import neither torch nor transformers: the configs live in
modules apart from the passes' code (``sparsify/passes/*_config.py``), the passes load when a run needs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sparsify.passes import CONFIGS, PASSES

PROBE = """
import json, sys
from sparsify.cli import app
try:
    app({args}, prog_name="sparsify")
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "transformers", "safetensors", "compressed_tensors") if m in sys.modules)
print(json.dumps({{"code": code, "heavy": heavy}}))
"""


@pytest.mark.parametrize(
    "args", [["-h"], ["--version"], ["prune", "-h"], ["quantize", "-h"], ["compress", "-h"], ["export", "gguf", "-h"]]
)
def test_help_and_version_import_neither_torch_nor_transformers(args):
    out = subprocess.run([sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "heavy": []}, out.stdout[-2000:]


def test_a_recipe_is_validated_without_torch(tmp_path):
    code = (
        "import sys; from sparsify.recipe import parse_recipe; "
        "parse_recipe({'passes': [{'type': 'prune', 'method': 'sparsegpt', 'sparsity': 0.5},"
        " {'type': 'quantize', 'scheme': 'w4a16', 'target_bpw': 5}, {'type': 'heal'}]}); "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out.stderr[-2000:]


def test_every_config_has_its_pass_and_every_pass_its_config():
    assert {c.model_fields["type"].default for c in CONFIGS} == set(PASSES)
    for name, cls in PASSES.items():
        assert cls.config_cls in CONFIGS, name
        assert (cls.layerwise, cls.whole_model) == (cls.config_cls.layerwise, cls.config_cls.whole_model)


def test_the_structured_metric_names_are_the_maths():
    from sparsify.algorithms.structured import CHANNEL_METRICS, LAYER_METRICS
    from sparsify.passes.prune_methods import CHANNEL_METRIC_NAMES, LAYER_METRIC_NAMES

    assert tuple(CHANNEL_METRICS) == CHANNEL_METRIC_NAMES and tuple(LAYER_METRICS) == LAYER_METRIC_NAMES
