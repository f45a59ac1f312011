"""Fail fast on a config that would silently do the wrong thing.

Two checks, both run before any model is built:
1. The composed config is merged onto the typed schema (`utils.config.schema.LauncherConfig`), so an
   unknown key or a wrongly typed value in a launcher group raises with the key's full name.
2. Every `_target_` node (model, data, loss terms, evaluators, schedule, grad filter, loggers) is
   checked against its target's signature: a key the callable does not accept is an error naming the
   key, the target and the accepted names; a literal of the wrong basic type likewise.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any, Iterator

import torch
from hydra.utils import get_method
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from utils.config.errors import ConfigError, from_omegaconf, nearest_keys
from utils.config.schema import CurriculumConf, LauncherConfig
from utils.storage.checkpoint import MAX_WRITER_NICE
from utils.training.intervals import parse_interval

# Keys Hydra interprets itself inside a `_target_` node.
_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
# Keys the launcher consumes from a target node before instantiating it.
_LAUNCHER_KEYS = {"weight_schedule"}
# The optim node's own keys (utils.optim.builder.build_optimizers); its null keys are not passed on.
_OPTIM_KEYS = {"param_groups", "components", "modules", "schedule"}


def validate_config(cfg: DictConfig, model_given: bool = False) -> DictConfig:
    """Return `cfg` merged onto the schema (typed, struct mode); raise ConfigError on any problem.

    `model_given`: the caller trains a model instance (the Python API), so `model` may be unset."""
    schema = OmegaConf.structured(LauncherConfig)
    user = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"]) if "hydra" in cfg else cfg
    try:
        merged = OmegaConf.merge(schema, user)
    except OmegaConfBaseException as err:
        raise from_omegaconf(err) from None
    if merged.curriculum is not None:
        try:
            merged.curriculum = OmegaConf.merge(OmegaConf.structured(CurriculumConf), merged.curriculum)
        except OmegaConfBaseException as err:
            raise from_omegaconf(err, prefix="curriculum") from None
    OmegaConf.set_struct(merged, True)
    _check_schema_keys(merged, "")
    for path, node in _target_nodes(merged):
        check_target_node(path, node)
    _check_optim_components(merged)
    _check_trainer(merged, model_given)
    _check_curriculum(merged)
    return merged


def _check_schema_keys(node: DictConfig, path: str) -> None:
    """Hydra's `+key=value` can add keys to a typed node; a key its dataclass lacks is a typo."""
    node_type = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(node_type):
        known = [f.name for f in dataclasses.fields(node_type)]
        for key in node.keys():
            if key not in known:
                full = f"{path}.{key}" if path else str(key)
                raise ConfigError(
                    f"Unknown config key '{full}'{nearest_keys(str(key), known)}; "
                    f"valid keys{' of ' + path if path else ''}: {', '.join(known)}."
                )
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing() \
                and dataclasses.is_dataclass(OmegaConf.get_type(child)):
            _check_schema_keys(child, f"{path}.{key}" if path else str(key))


def _check_optim_components(cfg: DictConfig) -> None:
    """A component without its own `_target_` inherits the main optimizer's: check its keys against that."""
    optim = cfg.optim
    if not isinstance(optim, DictConfig) or optim.get("_target_") is None:
        return
    for name, component in (optim.get("components") or {}).items():
        if isinstance(component, DictConfig) and component.get("_target_") is None:
            inherited = OmegaConf.merge({"_target_": optim._target_}, component)
            check_target_node(f"optim.components.{name}", inherited)


def _check_curriculum(cfg: DictConfig) -> None:
    """Each stage's data node (the base `data` with the stage's overrides) must fit its target's signature."""
    if cfg.curriculum is None:
        return
    for i, stage in enumerate(cfg.curriculum.stages):
        if stage.data is None:
            continue
        where = f"curriculum.stages[{i}].data"
        if "_target_" in stage.data:
            continue  # a full node: already checked with every other `_target_` node
        try:
            merged = OmegaConf.merge(cfg.data, stage.data)
        except OmegaConfBaseException as err:
            if getattr(err, "full_key", None):  # a key that `data` does not have
                raise ConfigError(
                    f"'{where}' sets {err.full_key}, which the data config ({cfg.data.get('_target_')}) does not "
                    f"have: a stage's data keys override keys of `data`. Select the data this curriculum is "
                    f"written for (data=...), or fix the key."
                ) from None
            first_line = str(getattr(err, "msg", err)).splitlines()[0]
            raise ConfigError(f"'{where}': {first_line}") from None
        check_target_node(where, merged)


def _target_nodes(node: Any, path: str = "") -> Iterator[tuple[str, DictConfig]]:
    if isinstance(node, (DictConfig, ListConfig)) and (node._is_none() or node._is_missing()):
        return
    if isinstance(node, DictConfig):
        if node.get("_target_") is not None:
            yield path, node
        for key in node.keys():
            child_path = f"{path}.{key}" if path else str(key)
            if key == "_target_":
                continue
            yield from _target_nodes(node._get_node(key), child_path)
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            yield from _target_nodes(item, f"{path}[{i}]")


def check_target_node(path: str, node: DictConfig) -> None:
    """Check one `_target_` node's keys (and literal types) against the target's signature."""
    target = node._target_
    try:
        fn = get_method(target) if not isinstance(target, type) else target
    except Exception as err:  # hydra raises a bare Exception subclass for import failures
        raise ConfigError(f"'{path}._target_: {target}' cannot be imported: {err}") from None
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins without a signature: nothing to check
    params = sig.parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    try:
        hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    except Exception:  # unresolvable forward references: skip type checks, keep name checks
        hints = {}
    is_optim = path == "optim" or path.startswith("optim.components.")
    for key in node.keys():
        if key in _HYDRA_KEYS or key in _LAUNCHER_KEYS:
            continue
        if is_optim and (key in _OPTIM_KEYS or node._get_node(key)._is_none()):
            continue
        if key not in params:
            if takes_kwargs:
                continue
            accepted = sorted(n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL,))
            raise ConfigError(
                f"Unknown key '{path}.{key}' for {target}{nearest_keys(str(key), accepted)}. Accepted keys: {', '.join(accepted)}."
            )
        _check_literal_type(path, key, node, hints.get(key))


_BASIC = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}


def _check_literal_type(path: str, key: str, node: DictConfig, hint: Any) -> None:
    if hint is None or OmegaConf.is_missing(node, key):
        return
    child = node._get_node(key)
    if child is None or child._is_interpolation():
        return
    value = child._value()
    if value is None or isinstance(value, (DictConfig, ListConfig)):
        return
    allowed = _allowed_types(hint)
    if allowed is None:
        return
    if isinstance(value, bool) and bool not in allowed:
        ok = False
    else:
        ok = isinstance(value, allowed)
    if not ok:
        names = "/".join(t.__name__ for t in allowed)
        raise ConfigError(f"'{path}.{key}' must be {names}, got {type(value).__name__} {value!r}.")


def _allowed_types(hint: Any) -> tuple[type, ...] | None:
    """The basic python types a hint admits for a literal, or None when anything might do.

    `Union[float, Tensor]` (torch's `lr`) admits the literals int/float: a Tensor cannot be written in a
    config, so its arm adds nothing; a `str`, `Any` or unknown arm makes the check give up.
    """
    if hint in _BASIC:
        return _BASIC[hint]
    origin = typing.get_origin(hint)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        out: list[type] = []
        for arg in typing.get_args(hint):
            if arg is type(None):
                continue
            if arg in _BASIC:
                out.extend(_BASIC[arg])
            elif arg is not torch.Tensor:
                return None
        return tuple(out) or None
    return None


STRATEGIES = ("ddp", "fsdp")  # trainer.strategy


def _check_strategy(cfg: DictConfig) -> None:
    t = cfg.trainer
    if t.strategy not in STRATEGIES:
        raise ConfigError(f"trainer.strategy must be one of {', '.join(STRATEGIES)}, got {t.strategy!r}"
                          f"{nearest_keys(str(t.strategy), list(STRATEGIES))}.")
    if t.strategy != "fsdp":
        return
    # What keeps state shaped like the whole model, next to FSDP's shards, is not wired to them (yet).
    grad_filter = (cfg.get("grad_filter") or {}).get("_target_")
    if grad_filter not in (None, "utils.optim.grad_filters.NoFilter"):
        raise ConfigError(f"trainer.strategy=fsdp does not support grad filters yet (grad_filter is {grad_filter}); "
                          "use grad_filter=none, or trainer.strategy=ddp.")
    if t.ema.enabled:
        raise ConfigError("trainer.strategy=fsdp does not support trainer.ema yet; set trainer.ema.enabled=false, "
                          "or use trainer.strategy=ddp.")
    if t.precision == "fp16":
        raise ConfigError("trainer.strategy=fsdp does not support trainer.precision=fp16 (GradScaler over sharded "
                          "gradients); use bf16 or fp32.")


def _check_trainer(cfg: DictConfig, model_given: bool) -> None:
    t = cfg.trainer
    if t.monitor_mode not in ("min", "max"):
        raise ConfigError(f"trainer.monitor_mode must be 'min' or 'max', got {t.monitor_mode!r}.")
    if t.precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"trainer.precision must be fp32, bf16 or fp16, got {t.precision!r}.")
    _check_strategy(cfg)
    for key in ("max_steps", "global_batch_size", "log_interval"):
        if t[key] <= 0:
            raise ConfigError(f"trainer.{key} must be positive, got {t[key]}.")
    for key in ("eval_batch_size", "eval_max_batches", "max_epochs", "cpu_threads", "dist_timeout_s"):
        if t[key] is not None and t[key] <= 0:
            raise ConfigError(f"trainer.{key} must be positive (or null), got {t[key]}.")
    if not 0.0 <= t.ema.decay <= 1.0:
        raise ConfigError(f"trainer.ema.decay must be in [0, 1] (0.999 is usual), got {t.ema.decay}.")
    if t.max_consecutive_nonfinite <= 0:
        raise ConfigError(f"trainer.max_consecutive_nonfinite must be positive, got {t.max_consecutive_nonfinite}.")
    if t.grad_clip is not None and t.grad_clip <= 0:
        raise ConfigError(f"trainer.grad_clip must be positive (or null to disable), got {t.grad_clip}.")
    if t.checkpoint.keep_last <= 0:
        raise ConfigError(f"trainer.checkpoint.keep_last must be positive, got {t.checkpoint.keep_last}.")
    if not 0 <= t.checkpoint.writer_nice <= MAX_WRITER_NICE:
        raise ConfigError(f"trainer.checkpoint.writer_nice must be in 0..{MAX_WRITER_NICE} (a thread's nice value above "
                          f"the process's), got {t.checkpoint.writer_nice}.")
    parse_interval(t.eval_interval, "trainer.eval_interval")
    parse_interval(t.checkpoint.interval, "trainer.checkpoint.interval")
    if t.plot_interval is not None:
        parse_interval(t.plot_interval, "trainer.plot_interval")
    for name in ("data", "loss") if model_given else ("model", "data", "loss"):
        if cfg[name] is None:
            raise ConfigError(f"No '{name}' configured: pick one, e.g. `{name}=...` or an `experiment=...` preset.")
