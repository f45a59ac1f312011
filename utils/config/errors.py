"""The error a user can fix by changing the config or the input (exit code 2, no traceback)."""

from __future__ import annotations

import dataclasses
import difflib

from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException


class ConfigError(ValueError):
    """A config value or input the launcher cannot use; the message names the key or file and the fix."""


def nearest_keys(key: str, candidates: list[str]) -> str:
    """'; did you mean a, b?' for the closest spellings among `candidates` ('' when none is close)."""
    close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def from_omegaconf(err: OmegaConfBaseException, override: str | None = None, prefix: str = "") -> ConfigError:
    """One short message for a key or value the typed schema refuses (while composing or merging).

    Hydra's own text for a typo in a typed group advises appending with `+`, which is wrong for a typo;
    this names the key, the problem and the valid (nearest) keys instead.
    """
    full_key = getattr(err, "full_key", None) or "?"
    if prefix:
        full_key = f"{prefix}.{full_key}" if not str(full_key).startswith("[") else f"{prefix}{full_key}"
    node_type = getattr(err, "object_type", None)
    known = [f.name for f in dataclasses.fields(node_type)] if dataclasses.is_dataclass(node_type) else []
    if isinstance(err, (ConfigAttributeError, ConfigKeyError)) and known:
        key = str(full_key).rsplit(".", 1)[-1]
        parent = str(full_key).rsplit(".", 1)[0] if "." in str(full_key) else ""
        return ConfigError(
            f"Unknown config key '{full_key}'{nearest_keys(key, known)} "
            f"(valid keys{' of ' + parent if parent else ''}: {', '.join(known)})."
        )
    detail = str(getattr(err, "msg", None) or err).splitlines()[0]
    where = f" (from `{override}`)" if override else ""
    return ConfigError(
        f"Invalid value for '{full_key}'{where}: {detail}. "
        "Fix the value (`python pretrain.py --cfg job` prints the composed config)."
    )


def from_hydra(err: Exception) -> ConfigError:
    """A ConfigError for an exception Hydra raised while parsing overrides or composing the config."""
    cause = err.__cause__
    if isinstance(cause, OmegaConfBaseException):
        text = str(err)
        override = text.split("override ", 1)[1].split()[0].strip("'") if "override " in text else None
        return from_omegaconf(cause, override)
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ConfigError(first_line.rstrip(".") + ". (`python pretrain.py --help` lists the config groups and options.)")
