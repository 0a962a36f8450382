"""Which Linears a pass touches: the matching rules of compressed-tensors / llm-compressor recipes, plus one.

- ``ignore`` is applied first.
- ``"re:<regex>"`` is matched with ``re.match`` against the module's fully-qualified name (fqn): anchored
  at the start only, as compressed-tensors does, so ``re:model.layers.1`` also matches layers 10-19 and
  ``re:.*q_proj$`` needs its ``$``.
- Any other string matches a module whose fqn equals it, or whose class (or a base class) has that name
  (``Linear``), as compressed-tensors does; sparsify also matches it as a ``.name`` suffix of the fqn
  (``q_proj`` matches ``model.layers.0.self_attn.q_proj``).
- An entry that matches no module of the model is an error (a typo never silently selects nothing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from sparsify.arch import EXPERT_LINEARS, Arch, supported_list
from sparsify.errors import SparsifyError
from sparsify.modules import is_linear


def _compile(pattern: str) -> re.Pattern[str] | str:
    if pattern.startswith("re:"):
        try:
            return re.compile(pattern[3:])
        except re.error as e:
            raise SparsifyError(f"bad regex in target {pattern!r}: {e}") from None
    return pattern


def matches(fqn: str, module: nn.Module, pattern: re.Pattern[str] | str) -> bool:
    if isinstance(pattern, re.Pattern):
        return pattern.match(fqn) is not None
    if fqn == pattern or fqn.endswith("." + pattern):
        return True
    return any(cls.__name__ == pattern for cls in type(module).__mro__)


@dataclass
class TargetMatcher:
    """Compiled ``targets``/``ignore``: resolves a pass's Linears in a layer as the layer is now, by name."""

    patterns: list[re.Pattern[str] | str]
    ignores: list[re.Pattern[str] | str]

    def selects(self, fqn: str, module: nn.Module) -> bool:
        if not is_linear(module) or any(matches(fqn, module, p) for p in self.ignores):
            return False
        return any(matches(fqn, module, p) for p in self.patterns)

    def resolve(self, layer: nn.Module, prefix: str) -> dict[str, nn.Module]:
        found = ((f"{prefix}.{name}", m) for name, m in layer.named_modules() if name)
        return {fqn: m for fqn, m in found if self.selects(fqn, m)}


@dataclass
class TargetSelection:
    """Per layer index, the matched Linears by fqn; and what matched but cannot be compressed."""

    per_layer: dict[int, dict[str, nn.Module]]
    matcher: TargetMatcher
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
        patterns = [_compile(f"re:{re.escape(layers_path)}\\.\\d+\\.{re.escape(t)}$") for t in arch.targets]
        if arch.ffn == "experts":
            patterns.append(_compile(f"re:{re.escape(layers_path)}\\.\\d+\\.{EXPERT_LINEARS}$"))
    else:
        if not targets:
            raise SparsifyError("targets is empty; name at least one Linear or regex")
        patterns = [_compile(t) for t in targets]
        _check_each_matches(model, targets, patterns, "targets", linear_only=True)
    ignores = [_compile(t) for t in ignore]
    _check_each_matches(model, ignore, ignores, "ignore", linear_only=False)
    prefix = layers_path + "."
    matcher = TargetMatcher(patterns, ignores)
    selection = TargetSelection(per_layer={i: {} for i in range(num_layers)}, matcher=matcher)
    for fqn, module in model.named_modules():
        if not matcher.selects(fqn, module):
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


def _check_each_matches(
    model: nn.Module, entries: list[str], patterns: list[re.Pattern[str] | str], what: str, linear_only: bool
) -> None:
    """Every ``targets`` entry must match a Linear and every ``ignore`` entry some module."""
    modules = [(fqn, m) for fqn, m in model.named_modules() if fqn and (is_linear(m) or not linear_only)]
    for entry, pattern in zip(entries, patterns, strict=True):
        if not any(matches(fqn, m, pattern) for fqn, m in modules):
            kind = "Linear" if linear_only else "module"
            raise SparsifyError(
                f"{what} entry {entry!r} matches no {kind} of this model; run `sparsify inspect MODEL` to see the"
                " names (re: patterns are matched from the start of the name, as in compressed-tensors)"
            )
