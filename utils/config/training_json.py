"""`training_json=FILE`: a JSON file's "training" block, turned into launcher overrides before Hydra composes.

    python train.py experiment=rgm_mnist training_json=mnist_config.json [more overrides]

The format is the one of the RGM seed's `mnist_config.json`; each key maps onto one launcher key:

    n_epochs                 trainer.max_epochs
    batch_size               trainer.global_batch_size
    learning_rate            optim.lr
    log_interval             trainer.log_interval                      (steps)
    checkpoint_interval      trainer.checkpoint.interval               (epochs: 5 -> "5 epochs")
    validation_interval      trainer.eval_interval                     (epochs)
    plot_frequency           trainer.plot_interval                     (epochs)
    grad_clip                trainer.grad_clip                         (max gradient norm; null: off)
    early_stopping           trainer.early_stopping: enabled, patience (evaluations), min_delta
    optimizer                optim=<type> (adam, adamw, sgd); betas, weight_decay, eps, momentum
    scheduler                schedule=<type> (plateau, cosine -> cosine_annealing, constant); factor,
                             patience (evaluations), min_lr, threshold

The overrides take the place of the `training_json=` argument, so arguments after it win over the file
and arguments before it lose. A key the mapping does not know, a value of the wrong kind, a missing or
malformed file: a ConfigError naming the file and the key. `expand_training_json` is applied by train.py,
pretrain.py and `utils.training.api.compose`, so the three take the same arguments.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from utils.config.errors import ConfigError, nearest_keys

ARGUMENT = "training_json"


def expand_training_json(args: Sequence[str]) -> list[str]:
    """`args` with every `training_json=FILE` replaced by the overrides its "training" block stands for."""
    out: list[str] = []
    for arg in args:
        name, sep, value = arg.lstrip("+").partition("=")
        if sep and name == ARGUMENT:
            out.extend(overrides_from_file(Path(value).expanduser()))
        else:
            out.append(arg)
    return out


def overrides_from_file(path: Path) -> list[str]:
    where = f"{ARGUMENT}={path}"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{where}: cannot read the file ({err.strerror}). Fix: give the path of a JSON file "
                          "with a \"training\" block (the seed's mnist_config.json).") from None
    try:
        content = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}.") from None
    if not isinstance(content, dict) or not isinstance(content.get("training"), dict):
        raise ConfigError(f"{where} has no \"training\" object at its top level; the format is "
                          "{\"training\": {\"n_epochs\": 50, \"batch_size\": 128, ...}}.")
    unknown = sorted(set(content) - {"training"})
    if unknown:
        raise ConfigError(f"{where}: unknown top-level key {unknown[0]!r}; this launcher maps only the \"training\" "
                          "block (model and data are chosen with model=..., data=... or experiment=...).")
    return overrides_from_training(content["training"], str(path))


# ---------------------------------------------------------------------------------------------- values
def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{key} must be a positive integer, got {value!r}")
    return value


def _nonnegative_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} must be an integer >= 0, got {value!r}")
    return value


def _number(key: str, value: Any, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (positive and value == 0):
        raise ValueError(f"{key} must be a {'positive' if positive else 'non-negative'} number, got {value!r}")
    return float(value)


def _positive(key: str, value: Any) -> float:
    return _number(key, value, positive=True)


def _epochs(key: str, value: Any) -> str:
    return f"{_positive_int(key, value)}_epochs"


def _grad_clip(key: str, value: Any) -> str | float:
    return "null" if value is None else _positive(key, value)


def _betas(key: str, value: Any) -> str:
    if not (isinstance(value, list) and len(value) == 2
            and all(not isinstance(b, bool) and isinstance(b, (int, float)) and 0 <= b < 1 for b in value)):
        raise ValueError(f"{key} must be two numbers in [0, 1), e.g. [0.9, 0.999], got {value!r}")
    return f"[{float(value[0])!r},{float(value[1])!r}]"


Convert = Callable[[str, Any], Any]

TRAINING: dict[str, tuple[str, Convert]] = {
    "n_epochs": ("trainer.max_epochs", _positive_int),
    "batch_size": ("trainer.global_batch_size", _positive_int),
    "learning_rate": ("optim.lr", _positive),
    "log_interval": ("trainer.log_interval", _positive_int),
    "checkpoint_interval": ("trainer.checkpoint.interval", _epochs),
    "validation_interval": ("trainer.eval_interval", _epochs),
    "plot_frequency": ("trainer.plot_interval", _epochs),
    "grad_clip": ("trainer.grad_clip", _grad_clip),
}
EARLY_STOPPING: dict[str, tuple[str, Convert]] = {
    "patience": ("trainer.early_stopping.patience", _positive_int),
    "min_delta": ("trainer.early_stopping.min_delta", _number),
}
OPTIMIZERS = {"adam": "adam", "adamw": "adamw", "sgd": "sgd"}  # JSON type -> conf/optim option
OPTIMIZER_KEYS: dict[str, dict[str, tuple[str, Convert]]] = {
    "adam": {"betas": ("optim.betas", _betas), "weight_decay": ("optim.weight_decay", _number),
             "eps": ("optim.eps", _positive)},
    "sgd": {"momentum": ("optim.momentum", _number), "weight_decay": ("optim.weight_decay", _number)},
}
OPTIMIZER_KEYS["adamw"] = OPTIMIZER_KEYS["adam"]
SCHEDULERS = {"plateau": "plateau", "cosine": "cosine_annealing", "constant": "constant"}  # -> conf/schedule
SCHEDULER_KEYS: dict[str, dict[str, tuple[str, Convert]]] = {
    "plateau": {"factor": ("schedule.factor", _positive), "patience": ("schedule.patience", _nonnegative_int),
                "min_lr": ("schedule.min_lr", _number), "threshold": ("schedule.threshold", _number)},
    "cosine": {"min_lr": ("schedule.min_lr", _number)},
    "constant": {},
}


def overrides_from_training(block: dict[str, Any], source: str) -> list[str]:
    """The launcher overrides of one "training" block (`source` names the file in messages)."""
    overrides: list[str] = []

    def fail(key: str, problem: str) -> ConfigError:
        return ConfigError(f"{ARGUMENT}={source}: {key}: {problem}.")

    def mapped(prefix: str, values: dict[str, Any], table: dict[str, tuple[str, Convert]], skip: set[str]) -> None:
        for key, value in values.items():
            if key in skip:
                continue
            full = f"{prefix}.{key}"
            if key not in table:
                known = sorted(set(table) | skip)
                raise fail(full, f"not a key this launcher knows{nearest_keys(key, known)}; the keys of {prefix} are "
                                 f"{', '.join(known) or '(none)'}")
            target, convert = table[key]
            try:
                overrides.append(f"{target}={convert(full, value)}")
            except ValueError as err:
                raise fail(full, str(err).removeprefix(f"{full} ")) from None

    nested = {"early_stopping", "optimizer", "scheduler"}
    mapped("training", block, TRAINING, skip=nested)
    if "early_stopping" in block:
        early = _object(block["early_stopping"], "training.early_stopping", fail)
        overrides.append("trainer.early_stopping.enabled=true")
        mapped("training.early_stopping", early, EARLY_STOPPING, skip=set())
    for name, choices, keys, group in (("optimizer", OPTIMIZERS, OPTIMIZER_KEYS, "optim"),
                                       ("scheduler", SCHEDULERS, SCHEDULER_KEYS, "schedule")):
        if name not in block:
            continue
        values = _object(block[name], f"training.{name}", fail)
        kind = values.get("type")
        if kind not in choices:
            raise fail(f"training.{name}.type", f"{kind!r} is not one this launcher maps; use one of "
                                                f"{', '.join(choices)}")
        overrides.append(f"{group}={choices[kind]}")
        mapped(f"training.{name}", values, keys[kind], skip={"type"})
    return overrides


def _object(value: Any, key: str, fail: Callable[[str, str], ConfigError]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise fail(key, f"must be a JSON object, got {value!r}")
    return value
