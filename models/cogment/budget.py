"""Cogment's parameter budget: the seed's table, and the model's own counts per component.

The seed (Cogment's training README) budgets RefinementCore 6.8M (with ACT), GatedLTM 2.4M, heads and
adapters 11.9M, 21.13M in all, within 25M. Here the components are top-level submodules of
``models.cogment.model.Cogment``: ``core`` + ``halting``, ``memory``, ``heads``. Counts come from
``models.components.parameters`` (on the meta device for a preset: no weights are allocated).
"""

from __future__ import annotations

from collections.abc import Mapping

SEED_BUDGET = {"refinement_core": 6_800_000, "gated_ltm": 2_400_000, "heads_and_adapters": 11_900_000,
               "total": 21_130_000}
TOTAL_LIMIT = 25_000_000
COMPONENT_MODULES = {"refinement_core": ("core", "halting"), "gated_ltm": ("memory",), "heads_and_adapters": ("heads",)}


def component_counts(counts: Mapping[str, int]) -> dict[str, int]:
    """Per-component sums of ``parameter_counts`` (per top-level submodule) and the total."""
    out = {name: sum(int(counts.get(m, 0)) for m in modules) for name, modules in COMPONENT_MODULES.items()}
    out["total"] = int(counts["total"])
    return out


def budget_lines(components: Mapping[str, int]) -> list[str]:
    """One line per component: count, the seed's figure and the difference; then the total against the limit."""
    lines = []
    for name, planned in SEED_BUDGET.items():
        have = components[name]
        lines.append(f"{name:<20} {have / 1e6:7.3f}M  (seed {planned / 1e6:.2f}M, {100 * (have - planned) / planned:+.1f}%)")
    verdict = "within" if components["total"] <= TOTAL_LIMIT else "OVER"
    lines.append(f"{'budget':<20} {verdict} {TOTAL_LIMIT / 1e6:.0f}M")
    return lines
