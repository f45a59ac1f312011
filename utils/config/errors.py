"""The error a user can fix by changing the config or the input (exit code 2, no traceback)."""

from __future__ import annotations

import dataclasses
import difflib
import re
from pathlib import Path

from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException


class ConfigError(ValueError):
    """A config value or input the launcher cannot use; the message names the key or file and the fix."""


def nearest_keys(key: str, candidates: list[str]) -> str:
    """' (did you mean a, b?)' for the closest spellings among `candidates` ('' when none is close)."""
    close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def from_omegaconf(err: OmegaConfBaseException, override: str | None = None, prefix: str = "") -> ConfigError:
    """One short message for a key or value the config refuses (while composing or merging).

    Hydra's own text for a typo advises appending with `+`, which is wrong advice for a typo; this names
    the key, the problem and the valid (nearest) keys instead.
    """
    full_key = str(getattr(err, "full_key", None) or "?")
    if prefix:
        full_key = f"{prefix}.{full_key}" if not full_key.startswith("[") else f"{prefix}{full_key}"
    if isinstance(err, (ConfigAttributeError, ConfigKeyError)):
        node_type = getattr(err, "object_type", None)
        parent = getattr(err, "parent_node", None)
        if dataclasses.is_dataclass(node_type):  # a typed group: its keys are all the keys there are
            known = [f.name for f in dataclasses.fields(node_type)]
            where = full_key.rsplit(".", 1)[0] if "." in full_key else ""
            return ConfigError(
                f"Unknown config key '{full_key}'{nearest_keys(full_key.rsplit('.', 1)[-1], known)}; "
                f"valid keys{' of ' + where if where else ''}: {', '.join(known)}."
            )
        known = [str(k) for k in parent.keys()] if hasattr(parent, "keys") else []
        suggestion = nearest_keys(full_key.rsplit(".", 1)[-1], known)
        plus = f" If its target really takes this key, add it with `+{override}`." if override else ""
        return ConfigError(f"Unknown config key '{full_key}'{suggestion}.{plus}")
    detail = str(getattr(err, "msg", None) or err).splitlines()[0]
    where = f" (from `{override}`)" if override else ""
    return ConfigError(
        f"Invalid value for '{full_key}'{where}: {detail}. "
        "Fix the value (`python pretrain.py --cfg job` prints the composed config)."
    )


def from_hydra(err: Exception) -> ConfigError:
    """A ConfigError for an exception Hydra raised while parsing overrides or composing the config."""
    text = str(err)
    cause = err.__cause__
    if isinstance(cause, OmegaConfBaseException):
        override = None
        if "To append to your config use +" in text:
            override = text.split("To append to your config use +", 1)[1].split()[0]
        elif "override " in text:
            override = text.split("override ", 1)[1].split()[0].strip("'.")
        return from_omegaconf(cause, override)
    missing = re.search(r"Could not (?:find|load) '([^']+)'", text)
    if missing:
        option = missing.group(1)
        group = option.rsplit("/", 1)[0] if "/" in option else option
        options = _group_options(group)
        listed = f"; the options of {group.split('/')[0]} are: {', '.join(options)}" if options else ""
        return ConfigError(f"No config option '{option}'{nearest_keys(option.split('/', 1)[-1], options)}{listed}.")
    first_line = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return ConfigError(first_line.rstrip(".") + ". (`python pretrain.py --help` lists the config groups and options.)")


def _group_options(option_path: str) -> list[str]:
    """The options of a config group under conf/ (e.g. 'model' -> ['grokking/transformer', ...])."""
    group = option_path.split("/")[0]
    root = Path(__file__).resolve().parents[2] / "conf" / group
    if not root.is_dir():
        return []
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))
