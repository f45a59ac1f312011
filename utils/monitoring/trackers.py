"""Experiment trackers for the `logger` config group: Weights & Biases and TensorBoard.

Each tracker is a `_target_` node under `logger.<name>` (conf/logger/*.yaml) and implements the
`utils.monitoring.run_logging.Tracker` protocol: a `run_id` attribute (stored in checkpoints under
"logger_run_ids", handed back as `resume_id` on resume), `log(metrics, step)`, `finish()` and the
optional `log_images(images, step)`. `Trainer._build_trackers` builds them on rank 0 only and passes
`run_dir`, `resume_id`, `start_step` and the resolved `config` to the constructors that accept them.

Secrets: a W&B API key is read by wandb itself from the environment (WANDB_API_KEY) or ~/.netrc;
no config key holds it. `scrub_secrets` redacts anything that looks like a credential from a config
dict before it is logged to a tracker or saved in a checkpoint.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REDACTED = "<redacted>"

# Key names that hold credentials: *api_key*, *secret*, *password*, and `token` alone or with a
# credential-ish prefix (hf_token, access_token, ...). `max_tokens`, `pad_token`, `tokenizer` are not.
_SECRET_KEY = re.compile(
    r"(api[_-]?key|secret|passw(or)?d|credential)"
    r"|^((auth|access|bearer|api|hf|wandb|github|gh|gitlab|refresh|session|id)[_-]?)?token$",
    re.IGNORECASE,
)
_SECRET_ENV = re.compile(r"(API_?KEY|TOKEN|SECRET|PASSWORD)", re.IGNORECASE)


def is_secret_key(key: Any) -> bool:
    return isinstance(key, str) and bool(_SECRET_KEY.search(key))


def _secret_env_values() -> list[str]:
    """Values of environment variables named like credentials (WANDB_API_KEY, HF_TOKEN, ...)."""
    return [v for k, v in os.environ.items() if _SECRET_ENV.search(k) and len(v) >= 8]


def scrub_secrets(obj: Any, _env: list[str] | None = None) -> Any:
    """A copy of a config dict/list with credentials replaced by "<redacted>".

    Redacts the value of every key named like a credential (see `is_secret_key`) and any string that
    contains the value of a credential environment variable (WANDB_API_KEY, ...), wherever it is.
    """
    env = _secret_env_values() if _env is None else _env
    if isinstance(obj, dict):
        return {
            k: (REDACTED if is_secret_key(k) and v not in (None, "") else scrub_secrets(v, env)) for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return type(obj)(scrub_secrets(v, env) for v in obj)
    if isinstance(obj, str) and any(secret in obj for secret in env):
        return REDACTED
    return copy.copy(obj)


def _flat_numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# ---------------------------------------------------------------------------------------------- W&B
STEP_KEY = "trainer/step"


def wandb_has_credentials() -> bool:
    """Whether wandb finds an API key (WANDB_API_KEY, settings files or ~/.netrc), without prompting or network."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    import wandb

    try:
        return bool(wandb.login(prompt=False, verify=False))
    except Exception as err:  # noqa: BLE001 - a malformed key or netrc: treat as none, say why
        log.warning("W&B: could not read credentials (%s).", err)
        return False


class WandbTracker:
    """Weights & Biases. Files go to `<run_dir>/wandb/`; a resumed run continues the same W&B run.

    `mode`: online | offline | disabled. Online with no API key configured falls back to offline (one
    log line); online with a key but no reachable server falls back to offline after `init_timeout`
    seconds. Offline runs are uploaded later with `wandb sync <run_dir>/wandb/offline-run-*`.
    Every metric is plotted against the trainer step (`trainer/step`), so a resumed run that re-logs
    steps after its checkpoint is not dropped by W&B's monotonic-step rule.
    """

    def __init__(
        self,
        project: str = "launcher",
        entity: str | None = None,
        name: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        notes: str | None = None,
        mode: str = "online",
        job_type: str | None = None,
        init_timeout: float = 60.0,
        run_dir: str | None = None,
        resume_id: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        import wandb

        mode = {"dryrun": "offline", "run": "online"}.get((mode or "online").lower(), (mode or "online").lower())
        if mode not in ("online", "offline", "disabled"):
            raise ValueError(f"logger.wandb.mode must be online, offline or disabled, got {mode!r}.")
        config = scrub_secrets(config or {})
        if mode == "online" and not wandb_has_credentials():
            log.warning(
                "W&B: mode=online but no API key is configured (WANDB_API_KEY unset, no api.wandb.ai entry in "
                "~/.netrc): logging OFFLINE instead. Set WANDB_API_KEY or run `wandb login`, then upload with "
                "`wandb sync %s/wandb/offline-run-*`.",
                run_dir or ".",
            )
            mode = "offline"
        wb_dir = Path(run_dir) if run_dir else Path.cwd()
        wb_dir.mkdir(parents=True, exist_ok=True)
        kwargs = {
            "project": project,
            "entity": entity,
            "name": name or config.get("run_name"),
            "group": group,
            "tags": [str(t) for t in tags] if tags else None,
            "notes": notes if notes is not None else config.get("notes"),
            "job_type": job_type,
            "config": config,
            "dir": str(wb_dir),
            "id": resume_id,
            "resume": "allow" if resume_id else None,
        }
        try:
            self.run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=init_timeout), **kwargs)
        except Exception as err:  # wandb raises several kinds for "server unreachable"; re-raised below if not online
            if mode != "online":
                raise
            log.warning("W&B: could not start an online run (%s): logging OFFLINE instead.", err)
            mode = "offline"
            self.run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=init_timeout), **kwargs)
        self.mode = mode
        self.run_id: str | None = None if mode == "disabled" else self.run.id
        self.run.define_metric(STEP_KEY)
        self.run.define_metric("*", step_metric=STEP_KEY)
        if mode == "offline":
            log.info(
                "W&B: offline run %s%s, files in %s; upload with `wandb sync %s`",
                self.run_id, " (resumed)" if resume_id else "", self.run.dir, Path(self.run.dir).parent,
            )
        elif mode == "online":
            log.info("W&B: run %s%s at %s", self.run_id, " (resumed)" if resume_id else "", self.run.url)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        values = _flat_numbers(metrics)
        if values:
            self.run.log({**values, STEP_KEY: step})

    def log_images(self, images: dict[str, Path], step: int) -> None:
        import wandb

        if images:
            self.run.log({**{f"plots/{k}": wandb.Image(str(p)) for k, p in images.items()}, STEP_KEY: step})

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


# --------------------------------------------------------------------------------------- TensorBoard
class TensorBoardTracker:
    """TensorBoard event files in `<run_dir>/tensorboard` (`tensorboard --logdir <run_dir>/tensorboard`).

    On resume, events newer than the resumed step are purged from the view (`purge_step`), so steps a
    killed run logged after its last checkpoint are not shown twice.
    """

    def __init__(
        self,
        subdir: str = "tensorboard",
        flush_secs: int = 30,
        run_dir: str | None = None,
        start_step: int = 0,
        config: dict[str, Any] | None = None,
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(run_dir or ".") / subdir
        self.writer = SummaryWriter(
            log_dir=str(self.log_dir), flush_secs=flush_secs, purge_step=start_step + 1 if start_step else None
        )
        self.run_id: str | None = None  # TensorBoard has no run id; the directory is the run
        if config and not start_step:
            import json

            text = json.dumps(scrub_secrets(config), indent=2, default=str)
            self.writer.add_text("config", "```\n" + text + "\n```", 0)
        log.info("TensorBoard: event files in %s (tensorboard --logdir %s)", self.log_dir, self.log_dir)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for key, value in _flat_numbers(metrics).items():
            self.writer.add_scalar(key, value, step)

    def log_images(self, images: dict[str, Path], step: int) -> None:
        from matplotlib.image import imread

        for key, path in images.items():
            img = imread(str(path))  # float HxWx{3,4} in [0, 1]
            if img.ndim == 3 and img.shape[2] == 4:
                img = img[:, :, :3]
            self.writer.add_image(f"plots/{key}", img, step, dataformats="HWC" if img.ndim == 3 else "HW")

    def finish(self) -> None:
        self.writer.flush()
        self.writer.close()
