"""Which Linears a pass touches: peft-style matching rules over fully-qualified module names.

- ``ignore`` is applied first.
- ``"re:<regex>"`` must full-match the module's fully-qualified name (fqn).
- Any other string matches an fqn exactly or as a ``.name`` suffix (``q_proj`` matches
  ``model.layers.0.self_attn.q_proj``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from sparsify.arch import Arch, supported_list
from sparsify.errors import SparsifyError
from sparsify.modules import is_linear


def _compile(pattern: str) -> re.Pattern[str] | str:
    if pattern.startswith("re:"):
        try:
            return re.compile(pattern[3:])
        except re.error as e:
            raise SparsifyError(f"bad regex in target {pattern!r}: {e}") from None
    return pattern


def matches(fqn: str, pattern: re.Pattern[str] | str) -> bool:
    if isinstance(pattern, re.Pattern):
        return pattern.fullmatch(fqn) is not None
    return fqn == pattern or fqn.endswith("." + pattern)


@dataclass
class TargetSelection:
    """Per layer index, the matched Linears by fqn; and what matched but cannot be compressed."""

    per_layer: dict[int, dict[str, nn.Module]]
    outside_layers: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.per_layer.values())


def select_targets(
    model: nn.Module,
    arch: Arch | None,
    layers_path: str,
    num_layers: int,
    targets: list[str] | None,
    ignore: list[str],
    model_type: str,
) -> TargetSelection:
    """Resolve ``targets``/``ignore`` to the Linears of each layer.

    With ``targets=None`` the table's defaults are used; an unknown architecture then needs
    explicit targets.
    """
    if targets is None:
        if arch is None:
            raise SparsifyError(
                f"model_type {model_type!r} is not in sparsify's architecture table "
                f"(supported: {supported_list()}); pass --targets to name the Linears to compress, "
                "e.g. --targets 're:.*(q|k|v|o)_proj'"
            )
        patterns = [_compile(f"re:{re.escape(layers_path)}\\.\\d+\\.{re.escape(t)}") for t in arch.targets]
    else:
        if not targets:
            raise SparsifyError("targets is empty; name at least one Linear or regex")
        patterns = [_compile(t) for t in targets]
    ignores = [_compile(t) for t in ignore]
    prefix = layers_path + "."
    selection = TargetSelection(per_layer={i: {} for i in range(num_layers)})
    for fqn, module in model.named_modules():
        if not is_linear(module) or any(matches(fqn, p) for p in ignores):
            continue
        if not any(matches(fqn, p) for p in patterns):
            continue
        if not fqn.startswith(prefix):
            selection.outside_layers.append(fqn)
            continue
        index = int(fqn[len(prefix) :].split(".", 1)[0])
        selection.per_layer[index][fqn] = module
    if selection.count == 0:
        raise SparsifyError(
            f"targets {targets or list(arch.targets if arch else [])} matched no Linear inside the layers "
            f"({layers_path}.N); run `sparsify inspect MODEL` to see the names"
        )
    return selection
