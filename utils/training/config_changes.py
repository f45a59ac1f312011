"""What a resume does when the config differs from the one the checkpoint was written with.

Every difference is printed. Then, by key:

- refused (exit 2, "use --fresh or another run_name"): what the checkpoint cannot be continued with:
  the model (`model.*`), the data (`data.*`, a stage's data), the seed (the data order), and the class of
  an optimizer, schedule, grad filter or loss term (`..._target_`), an optimizer component's modules or
  parameter groups;
- applied, with a warning: everything else a user reasonably changes between two runs of a job:
  `trainer.*` (max_steps, intervals, early stopping, logging...), loss weights, schedule and filter
  options, callbacks, trackers, and the optimizers' hyperparameters. The optimizers' state comes from the
  checkpoint, so a changed `lr` is applied by scaling every learning rate (schedule included) by new/old,
  and other optimizer keys (weight_decay, betas, momentum, ...) are written into their parameter groups.

Paths are not compared (a run directory can be moved).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from utils.config.errors import ConfigError
from utils.optim.builder import NamedOptimizer, optimizer_settings
from utils.optim.schedules import scale_learning_rate

log = logging.getLogger(__name__)

_IGNORED = re.compile(r"^paths\.")
_REFUSED = re.compile(
    r"^(model\.|data\.|seed$|curriculum\.stages\[\d+\]\.(data|name)\b|.*\._target_$"
    r"|optim\.components\.[^.]+\.modules|optim(\.components\.[^.]+)?\.param_groups)"
)
FIX = "Use --fresh to start over (the old files are kept aside) or pick another run_name=..."


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: leaf} of a plain config (lists of dicts are indexed: a.b[0].c)."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out or {prefix: {}}
    if isinstance(node, list) and any(isinstance(v, dict) for v in node):
        out = {}
        for i, value in enumerate(node):
            out.update(flatten(value, f"{prefix}[{i}]"))
        return out
    return {prefix: node}


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (saved value, current value)} of every leaf that differs (missing on one side: `<unset>`)."""
    a, b = flatten(saved), flatten(current)
    unset = "<unset>"
    return {
        key: (a.get(key, unset), b.get(key, unset))
        for key in sorted(set(a) | set(b))
        if a.get(key, unset) != b.get(key, unset) and not _IGNORED.match(key)
    }


def refuse_what_cannot_continue(saved: dict[str, Any], current: dict[str, Any], checkpoint: str) -> None:
    """ConfigError naming the keys when the config changed in a way a resume cannot honour."""
    refused = {k: v for k, v in config_differences(saved, current).items() if _REFUSED.match(k)}
    if refused:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in list(refused.items())[:6])
        raise ConfigError(
            f"{checkpoint} was written with another {'/'.join(sorted({_kind(k) for k in refused}))}, which a resume "
            f"cannot continue with ({listed}). {FIX}"
        )


def apply(saved: dict[str, Any], current: dict[str, Any], optimizers: list[NamedOptimizer],
          schedulers: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Apply (to the just-loaded optimizers) and print every difference; returns them."""
    changes = config_differences(saved, current)
    notes = _apply_optimizer_changes(saved, current, optimizers, schedulers) if changes else {}
    for key, (old, new) in changes.items():
        log.warning("Resuming with a changed config: %s: %r -> %r (applied%s)", key, old, new, notes.get(key, ""))
    return changes


def _kind(key: str) -> str:
    if key.startswith("model."):
        return "model"
    if key.startswith(("data.", "curriculum.")):
        return "data"
    if key == "seed":
        return "seed"
    return "class"


def _apply_optimizer_changes(saved: dict[str, Any], current: dict[str, Any], optimizers: list[NamedOptimizer],
                             schedulers: dict[str, Any]) -> dict[str, str]:
    """Write changed optimizer hyperparameters into the loaded optimizers; notes by config key."""
    notes: dict[str, str] = {}
    for named in optimizers:
        old, new = optimizer_settings(saved["optim"], named.name), optimizer_settings(current["optim"], named.name)
        where = "optim" if named.name == "main" else f"optim.components.{named.name}"
        for key in sorted(set(old) | set(new)):
            if old.get(key) == new.get(key):
                continue
            if key == "lr":
                ratio = float(new["lr"]) / float(old["lr"])
                scale_learning_rate(named.optimizer, schedulers.get(named.name), ratio)
                notes[f"{where}.lr"] = f": every learning rate of optimizer {named.name!r} x {ratio:.4g}, schedule included"
            elif key in new:
                value = tuple(new[key]) if isinstance(new[key], list) else new[key]
                for group in named.optimizer.param_groups:
                    group[key] = value
                notes[f"{where}.{key}"] = f": set in every parameter group of optimizer {named.name!r}"
    return notes
