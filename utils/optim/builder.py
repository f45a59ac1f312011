"""Build optimizers from the `optim` config group.

A config names the main optimizer (`_target_` plus its keyword arguments), optional per-parameter
`param_groups` (fnmatch globs on full parameter names) and optional `components`: extra optimizers
over named submodules, each with its own settings and (built by the caller) its own schedule.

Semantics worth knowing:

* Keys whose value is null are dropped: the typed schema carries every optional key of every
  supported optimizer, so null means "not set" (use the optimizer's default).
* A component inherits every main key it does not set (null in a component also means "not set",
  i.e. inherit). When a component switches `_target_`, inherited keys the new class does not accept
  are left out (an AdamW `betas` is meaningless for SGD); keys the component sets itself are always
  passed, so a typo there still fails loudly.
* Components inherit the main `param_groups`. A glob must match at least one parameter somewhere it
  applies (main or an inheriting component); a glob that matches nothing is a config error.
* The returned order is main first, then components in config order; checkpoints rely on it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig, OmegaConf

from utils.config.errors import ConfigError
from utils.modules import matches_prefix, unwrap_model

# Keys that configure this builder rather than the optimizer class.
_RESERVED_KEYS = {"param_groups", "components", "modules", "schedule"}
_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


@dataclass
class NamedOptimizer:
    name: str  # "main" or the component name
    optimizer: torch.optim.Optimizer
    schedule_cfg: Any | None  # the component's `schedule` override; None for main / unset
    param_names: list[str] = field(default_factory=list)


def _to_container(cfg: Any) -> Any:
    """Plain dicts/lists from OmegaConf nodes (resolving interpolations) so we can mutate freely."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    if isinstance(cfg, Mapping):
        return {k: _to_container(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [_to_container(v) for v in cfg]
    return cfg





def _clean_value(value: Any) -> Any:
    # Optimizers index `betas` like a tuple; some (AdamAtan2) annotate it as one.
    if isinstance(value, list):
        return tuple(value)
    return value


def _optimizer_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        k: _clean_value(v)
        for k, v in spec.items()
        if v is not None and k not in _RESERVED_KEYS and k not in _HYDRA_KEYS
    }


def _accepts(cls: type, key: str) -> bool:
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return True
    return key in params


@dataclass
class _Spec:
    """One optimizer to build: its settings, parameter names and the glob list it uses."""

    name: str
    target: str | None
    kwargs: dict[str, Any]
    param_groups: list[dict[str, Any]]
    schedule_cfg: Any | None
    param_names: list[str] = field(default_factory=list)


def _normalise_groups(raw: Any, where: str) -> list[dict[str, Any]]:
    groups = []
    for i, entry in enumerate(raw or []):
        if not isinstance(entry, Mapping) or entry.get("params") in (None, ""):
            raise ValueError(f"{where}.param_groups[{i}] needs a `params` glob, got {entry!r}")
        globs = entry["params"]
        globs = [globs] if isinstance(globs, str) else list(globs)
        settings = {k: _clean_value(v) for k, v in entry.items() if k != "params" and v is not None}
        groups.append({"globs": globs, "settings": settings, "label": f"{where}.param_groups[{i}]"})
    return groups


def _claim_component_params(
    model: torch.nn.Module, trainable: list[str], components: dict[str, Any]
) -> dict[str, list[str]]:
    owner: dict[str, str] = {}
    claimed: dict[str, list[str]] = {}
    for comp_name, comp_cfg in components.items():
        modules = (comp_cfg or {}).get("modules") or []
        modules = [modules] if isinstance(modules, str) else list(modules)
        names = [n for n in trainable if any(matches_prefix(n, m) for m in modules)]
        if not names:
            top_level = [n for n, _ in model.named_children()]
            raise ValueError(
                f"optim component {comp_name!r}: modules {modules} match no trainable parameter; "
                f"the model's top-level submodules are {top_level}"
            )
        for n in names:
            if n in owner:
                raise ValueError(
                    f"parameter {n!r} is claimed by both optim components "
                    f"{owner[n]!r} and {comp_name!r}"
                )
            owner[n] = comp_name
        claimed[comp_name] = names
    return claimed


def _component_spec(
    comp_name: str, comp_cfg: dict[str, Any], main_cfg: dict[str, Any], inherited_groups: list
) -> _Spec:
    own = {k: v for k, v in comp_cfg.items() if v is not None}
    target = own.get("_target_", main_cfg.get("_target_"))
    if target is None:
        raise ValueError(f"optim component {comp_name!r} has no `_target_` and neither has the main optimizer")
    cls = get_class(target)
    switched = target != main_cfg.get("_target_")
    kwargs = {}
    for key, value in _optimizer_kwargs(main_cfg).items():
        # Drop inherited keys the component's own class would reject (see module docstring).
        if key in own or (switched and not _accepts(cls, key)):
            continue
        kwargs[key] = value
    kwargs.update(_optimizer_kwargs(own))
    groups = inherited_groups
    if "param_groups" in own:  # not in the schema, but allow it for plain-dict configs
        groups = _normalise_groups(own["param_groups"], f"optim.components.{comp_name}")
    return _Spec(comp_name, target, kwargs, groups, comp_cfg.get("schedule"))


def _split_into_groups(
    spec: _Spec, params: dict[str, torch.nn.Parameter], matched_globs: set[tuple[str, str]]
) -> list[dict[str, Any]]:
    """First matching glob wins; leftovers form the default group (listed first)."""
    buckets: list[list[str]] = [[] for _ in spec.param_groups]
    default: list[str] = []
    for name in spec.param_names:
        for gi, group in enumerate(spec.param_groups):
            hit = next((g for g in group["globs"] if fnmatchcase(name, g)), None)
            if hit is not None:
                buckets[gi].append(name)
                matched_globs.add((group["label"], hit))
                break
        else:
            default.append(name)
    out = []
    if default:
        out.append({"params": [params[n] for n in default]})
    for group, names in zip(spec.param_groups, buckets):
        if names:  # an empty group would only trip the optimizer; unmatched globs are checked later
            out.append({"params": [params[n] for n in names], **group["settings"]})
    return out


def optimizer_settings(optim_cfg: Any, name: str) -> dict[str, Any]:
    """The keyword arguments optimizer `name` ("main" or a component) is built with (inheritance applied)."""
    cfg = _to_container(optim_cfg) or {}
    if name == "main":
        return _optimizer_kwargs(cfg)
    component = (cfg.get("components") or {}).get(name) or {}
    return _component_spec(name, component, cfg, []).kwargs


def build_optimizers(model: torch.nn.Module, optim_cfg: Any) -> list[NamedOptimizer]:
    """One optimizer per component plus "main" for everything unclaimed; [] if nothing is trainable."""
    model = unwrap_model(model)
    cfg = _to_container(optim_cfg) or {}
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    trainable = list(params)
    if not trainable:
        return []  # e.g. models that learn with local rules

    components = cfg.get("components") or {}
    main_groups = _normalise_groups(cfg.get("param_groups"), "optim")
    claimed = _claim_component_params(model, trainable, components)

    specs: list[_Spec] = []
    taken = {n for names in claimed.values() for n in names}
    unclaimed = [n for n in trainable if n not in taken]
    if unclaimed:
        if cfg.get("_target_") is None:
            raise ValueError(
                f"optim._target_ is null but {len(unclaimed)} trainable parameters belong to no "
                f"component (e.g. {unclaimed[:5]})"
            )
        specs.append(_Spec("main", cfg["_target_"], _optimizer_kwargs(cfg), main_groups, None, unclaimed))
    for comp_name, comp_cfg in components.items():
        spec = _component_spec(comp_name, comp_cfg or {}, cfg, main_groups)
        spec.param_names = claimed[comp_name]
        specs.append(spec)

    matched_globs: set[tuple[str, str]] = set()
    split = [_split_into_groups(spec, params, matched_globs) for spec in specs]
    # Every glob declared must match something wherever its list is used (catches typos).
    used = {g["label"]: g for s in specs for g in s.param_groups}
    for group in used.values():
        for glob in group["globs"]:
            if (group["label"], glob) not in matched_globs:
                raise ValueError(f"{group['label']}: glob {glob!r} matches no trainable parameter")

    result = []
    for spec, groups in zip(specs, split):
        where = "optim" if spec.name == "main" else f"optim.components.{spec.name}"
        try:
            optimizer = get_class(spec.target)(groups, **spec.kwargs)
        # What torch's optimizers raise for bad settings: ValueError (lr < 0), IndexError (betas=[0.9]),
        # RuntimeError (fused=true with foreach=true or differentiable=true)
        except (ValueError, IndexError, RuntimeError) as err:
            settings = ", ".join(f"{k}={v!r}" for k, v in spec.kwargs.items())
            raise ConfigError(f"{where}: {spec.target} refused its settings ({settings}): {str(err).rstrip('.') or type(err).__name__}. "
                              f"Fix {where}.*") from None
        result.append(NamedOptimizer(spec.name, optimizer, spec.schedule_cfg, list(spec.param_names)))
    return result
