"""Trackers (real wandb in offline mode, real TensorBoard event files), the metrics the loop logs, plots,
the console progress and `python -m utils.monitoring.report`, through the real CLI in subprocesses.

One module fixture runs everything once (two runs side by side, then a resume and the report), and the
tests read what those runs left: the console output, the run directory, the checkpoint. wandb never goes
online here: WANDB_MODE and every credential are removed from the environment and HOME points at an empty
temporary directory (no ~/.netrc), so `mode=online` exercises the no-key fallback.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.cli_helpers import ENV, REPO_ROOT, TINY, paths, read_metrics
from tests.conftest import compose_config
from utils.monitoring import report
from utils.monitoring.plots import FigureMaker, figure_keys, make_plots, metric_panels, series_of
from utils.monitoring.progress import PROGRESS_LINE, Progress, peak_memory_mib, token_count
from utils.monitoring.trackers import REDACTED, scrub_secrets

FAKE_KEY = "f4k3" * 10  # 40 characters, the shape of a W&B API key
FAST = ["debug=fast", *TINY]  # 6 steps, evaluated and checkpointed every 3, every step logged
TIMEOUT = 180  # a hanging W&B login/network wait would hit this
COMPONENTS = {"tok_emb", "pos_emb", "blocks", "ln_f", "head"}  # the tiny transformer's top-level submodules


def _env(home: Path, api_key: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in ENV.items() if not k.startswith("WANDB_") and k not in ("NETRC", "TQDM_DISABLE")}
    env["HOME"] = str(home)
    # matplotlib keeps its font cache under HOME: reuse this process's one instead of rebuilding it per run
    import matplotlib

    env["MPLCONFIGDIR"] = matplotlib.get_cachedir()
    if api_key:
        env["WANDB_API_KEY"] = api_key
    home.mkdir(parents=True, exist_ok=True)
    return env


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(proc: subprocess.Popen, timeout: float = TIMEOUT) -> dict:
    started = time.monotonic()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s (hung?): {proc.args}\n{err[-4000:]}") from None
    return {"rc": proc.returncode, "stdout": out, "stderr": err, "output": out + err,
            "waited_s": time.monotonic() - started, "cmd": proc.args}


def _check(result: dict) -> None:
    assert result["rc"] == 0, f"exit {result['rc']}: {result['cmd']}\n{result['output'][-6000:]}"


def _wandb_offline_dirs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("logging")
    root, data_root = base / "ck", base / "ds"
    multi_dir, online_dir = root / "multi", root / "online"
    multi_env = _env(base / "home_multi", api_key=FAKE_KEY)
    multi_args = ["pretrain.py", *FAST, *paths(root, data_root), "run_name=multi",
                  "logger=[wandb,tensorboard]", "logger.wandb.mode=offline"]
    # Both first runs side by side: the interpreter/torch/wandb start-ups overlap.
    multi = _start(multi_args, multi_env)
    online = _start(["pretrain.py", *FAST, *paths(root, data_root), "run_name=online", "logger=wandb"],
                    _env(base / "home_online"))
    first, online = _finish(multi), _finish(online)
    _check(first)
    plots_after_first = sorted(p.name for p in (multi_dir / "plots").glob("*.png"))
    first_latest = torch.load(multi_dir / "latest.pt", map_location="cpu", weights_only=True)
    # Resume with more steps (same key in the environment), then the report with the plots deleted first.
    resumed = _finish(_start([*multi_args, "trainer.max_steps=9"], multi_env))
    _check(resumed)
    for png in (multi_dir / "plots").glob("*.png"):
        png.unlink()
    rep = _finish(_start(["-m", "utils.monitoring.report", str(multi_dir)], multi_env))
    return {"base": base, "multi_dir": multi_dir, "online_dir": online_dir, "first": first, "online": online,
            "resumed": resumed, "report": rep, "plots_after_first": plots_after_first,
            "first_ids": first_latest["logger_run_ids"]}


# ------------------------------------------------------------------------------------------------ W&B
def test_wandb_offline_run_files_and_console(runs):
    run_id = runs["first_ids"]["wandb"]
    assert run_id and re.fullmatch(r"[a-z0-9]+", run_id), runs["first_ids"]
    dirs = _wandb_offline_dirs(runs["multi_dir"])
    assert dirs and dirs[0].name.endswith(f"-{run_id}"), dirs
    assert (dirs[0] / f"run-{run_id}.wandb").stat().st_size > 0  # the offline run's data file
    assert re.search(rf"W&B: offline run {run_id}\b.*wandb sync", runs["first"]["stderr"]), runs["first"]["stderr"][-3000:]
    assert "OFFLINE instead" not in runs["first"]["output"]  # mode=offline was asked for: no fallback message


def test_resume_continues_the_same_wandb_run(runs):
    run_id = runs["first_ids"]["wandb"]
    dirs = _wandb_offline_dirs(runs["multi_dir"])
    assert len(dirs) == 2 and all(d.name.endswith(f"-{run_id}") for d in dirs), dirs  # one per session, same id
    assert f"W&B: offline run {run_id} (resumed)" in runs["resumed"]["stderr"], runs["resumed"]["stderr"][-3000:]
    latest = torch.load(runs["multi_dir"] / "latest.pt", map_location="cpu", weights_only=True)
    assert latest["train_state"]["step"] == 9
    assert latest["logger_run_ids"]["wandb"] == run_id


def test_online_without_api_key_falls_back_to_offline(runs):
    online = runs["online"]
    _check(online)
    lines = [line for line in online["output"].splitlines() if "logging OFFLINE instead" in line]
    assert len(lines) == 1 and "no API key" in lines[0], online["output"][-4000:]
    assert _wandb_offline_dirs(runs["online_dir"]), list((runs["online_dir"] / "wandb").iterdir())
    assert not list((runs["online_dir"] / "wandb").glob("run-*")), "an online run was attempted"
    assert online["waited_s"] < TIMEOUT


def test_api_key_is_never_written(runs):
    """Nothing any of the runs wrote (run dirs incl. wandb/, tensorboard/, .hydra/, checkpoints; HOME) holds the key."""
    checked = 0
    for dirpath, _dirs, files in os.walk(runs["base"]):
        for name in files:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            assert FAKE_KEY.encode() not in path.read_bytes(), f"the API key leaked into {path}"
            checked += 1
    wandb_files = [p for p in (runs["multi_dir"] / "wandb").rglob("*") if p.is_file()]
    assert checked > 30 and wandb_files and (runs["multi_dir"] / ".hydra" / "config.yaml").exists()


def test_scrub_secrets(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", FAKE_KEY)
    cfg = {
        "logger": {"wandb": {"api_key": "abc", "project": "p", "tags": [f"x{FAKE_KEY}", "ok"]}},
        "hf_token": "hf_xyz", "client_secret": "s", "password": "pw",
        "model": {"max_tokens": 5, "pad_token": "<pad>", "tokenizer": "bpe", "width": 32},
        "notes": None, "token": "",
    }
    out = scrub_secrets(cfg)
    assert out["logger"]["wandb"] == {"api_key": REDACTED, "project": "p", "tags": [REDACTED, "ok"]}
    assert out["hf_token"] == out["client_secret"] == out["password"] == REDACTED
    assert out["model"] == cfg["model"] and out["notes"] is None
    assert cfg["logger"]["wandb"]["api_key"] == "abc"  # a copy; the input is untouched


# ------------------------------------------------------------------------------------------ TensorBoard
def test_tensorboard_event_files_hold_scalars_and_images(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["multi_dir"] / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("train/loss", "val/loss", "val/acc", "lr/main", "train/grad_norm", "train/grad_norm/blocks",
                "time/samples_per_s", "memory/peak_rss_mib"):
        assert tag in tags["scalars"], (tag, tags["scalars"])
    assert sorted({e.step for e in acc.Scalars("train/loss")}) == list(range(1, 10))  # both sessions
    assert "plots/loss" in tags["images"], tags["images"]


# --------------------------------------------------------------------------------------------- metrics
def test_metrics_jsonl_has_component_grad_norms_throughput_and_memory(runs):
    train = read_metrics(runs["multi_dir"], "train")
    assert [r["step"] for r in train] == list(range(1, 10))
    for rec in train:
        norms = {k.removeprefix("train/grad_norm/") for k in rec if k.startswith("train/grad_norm/")}
        assert norms == COMPONENTS, sorted(rec)
        assert all(rec[f"train/grad_norm/{c}"] >= 0 for c in COMPONENTS)
        # the total is the root of the sum of squares of the parts (no parameter shared or left out here)
        parts = sum(rec[f"train/grad_norm/{c}"] ** 2 for c in COMPONENTS) ** 0.5
        assert rec["train/grad_norm"] == pytest.approx(parts, rel=1e-4)
        # 64 sequences of 4 tokens per step
        assert rec["time/tokens_per_s"] == pytest.approx(4 * rec["time/samples_per_s"], rel=1e-6)
        assert 10 < rec["memory/peak_rss_mib"] < 1e6
        assert "memory/peak_cuda_mib" not in rec  # CPU run
        assert rec["train/nonfinite_total"] == 0 and rec["time/step_s"] > 0 and "lr/main" in rec
    val = read_metrics(runs["multi_dir"], "val")
    assert [r["step"] for r in val] == [3, 6, 9] and all("val/acc" in r for r in val)
    starts = [r for r in read_metrics(runs["multi_dir"], "event") if r["event"] == "start"]
    assert [s["resumed_from_step"] for s in starts] == [0, 6] and all(s["time"] > 0 for s in starts)


def test_token_count_and_peak_memory():
    assert token_count({"inputs": torch.zeros(8, 5, dtype=torch.long)}) == 40
    assert token_count({"inputs": torch.zeros(8, 5)}) == 0  # features, not tokens
    assert token_count({"x": torch.zeros(3, dtype=torch.long)}) == 0
    assert peak_memory_mib(torch.device("cpu"))["memory/peak_rss_mib"] > 10


# ----------------------------------------------------------------------------------- plots and report
def test_plots_written_and_report_regenerates_them(runs):
    assert runs["plots_after_first"] == ["grad_norm.png", "loss.png", "lr.png", "val_metrics.png"]
    rep = runs["report"]
    _check(rep)
    latest = torch.load(runs["multi_dir"] / "latest.pt", map_location="cpu", weights_only=True)
    best, best_step = latest["train_state"]["best_metric"], latest["train_state"]["best_step"]
    out = rep["stdout"]
    assert f"best val/acc (max): {best:.6g} at step {best_step}" in out, out
    assert "steps:           9" in out and "stop reason:     max_steps=9 reached" in out, out
    assert "last validation (step 9)" in out and "non-finite steps skipped: 0" in out, out
    assert f"tracker wandb: run id {runs['first_ids']['wandb']}" in out and "wall time:" in out, out
    for name in runs["plots_after_first"]:
        png = runs["multi_dir"] / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    assert report.main([str(tmp_path / "missing")]) == 2


def _run_dir_with_evaluations(path: Path, accuracies: list[float], min_delta: float) -> Path:
    """A run directory as the trainer leaves it without a checkpoint: metrics.jsonl and .hydra/config.yaml."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(
        f"trainer:\n  monitor: val/acc\n  monitor_mode: max\n  early_stopping:\n    min_delta: {min_delta}\n"
    )
    records = [{"step": 10 * (i + 1), "kind": "val", "val/acc": acc} for i, acc in enumerate(accuracies)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_report_picks_the_best_step_by_the_trainers_min_delta_rule(tmp_path):
    # 0.54 beats 0.50 by less than min_delta=0.05: the trainer keeps step 10; 0.56 beats it by more.
    accuracies = [0.50, 0.54, 0.52, 0.56, 0.58]
    lines = report.summarize(_run_dir_with_evaluations(tmp_path / "strict", accuracies, min_delta=0.05))
    assert "best val/acc (max): 0.56 at step 40" in lines
    lines = report.summarize(_run_dir_with_evaluations(tmp_path / "any", accuracies, min_delta=0.0))
    assert "best val/acc (max): 0.58 at step 50" in lines
    lines = report.summarize(_run_dir_with_evaluations(tmp_path / "nan", [float("nan"), 0.3], min_delta=0.0))
    assert "best val/acc (max): 0.3 at step 20" in lines  # a NaN evaluation is never the best


def test_report_takes_the_best_step_and_min_delta_from_the_checkpoint(tmp_path):
    run_dir = _run_dir_with_evaluations(tmp_path / "run", [0.50, 0.54, 0.52], min_delta=0.0)
    # The checkpoint's config (the last session's) wins over .hydra/config.yaml, its train_state over both.
    config = {"trainer": {"monitor": "val/acc", "monitor_mode": "max", "early_stopping": {"min_delta": 0.05}}}
    torch.save({"config": config, "train_state": {"step": 30}}, run_dir / "latest.pt")
    assert "best val/acc (max): 0.5 at step 10" in report.summarize(run_dir)
    torch.save({"config": config, "train_state": {"step": 30, "best_metric": 0.52, "best_step": 30}}, run_dir / "latest.pt")
    lines = report.summarize(run_dir)
    assert "best val/acc (max): 0.52 at step 30" in lines and "steps:           30" in lines


def test_figure_maker_draws_calls_the_family_hook_and_logs_images(tmp_path):
    records = [{"step": s, "kind": "train", "train/loss": 3.0 / s, "train/ce": 2.0 / s, "train/aux": 1.0 / s,
                "train/grad_norm": 1.0, "train/grad_norm/body": 0.5, "lr/main": 1e-3 * s} for s in range(1, 80)]
    records += [{"step": 40, "kind": "val", "val/loss": 0.1, "val/acc": 0.5},
                {"step": 41, "kind": "val", "val/loss": "nan", "val/acc": 0.6}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"cut": ')

    class Family:
        def make_figures(self, run_dir: Path, step: int) -> dict[str, Path]:
            path = run_dir / "plots" / f"attention_{step}.png"
            path.write_bytes(b"png")
            return {"attention": path}

    class Broken:
        def make_figures(self, run_dir: Path, step: int) -> dict[str, Path]:
            raise RuntimeError("boom")

    logged = []
    maker = FigureMaker(tmp_path, [Family(), Broken(), object()], log_images=lambda im, st: logged.append((st, im)),
                        min_interval_s=3600)
    assert maker.maybe(10) == {}  # rate-limited: the first figures come min_interval_s after the start
    images = maker.now(79)
    assert set(images) == {"loss", "lr", "grad_norm", "val_metrics", "attention"}  # no model metrics: no train_metrics
    assert logged == [(79, images)] and all(p.exists() for p in images.values())
    assert set(make_plots(tmp_path / "missing")) == set()


def _records_of_a_recursive_model() -> list[dict]:
    """Losses, a term equal to the total, model metrics (act/...) and evaluator metrics, with a stage change."""
    records = []
    for s in range(1, 101):
        records.append({"step": s, "kind": "train", "train/loss": 4.0 / s, "train/ce": 4.0 / s, "train/act/steps": 3.0,
                        "train/grad_norm": 1.0, "lr/main": 1e-3})
        if s % 10 == 0:
            records.append({"step": s, "kind": "val", "val/loss": 4.0 / s, "val/ce": 4.0 / s, "val/acc": s / 100,
                            "val/act/steps": 3.5, "val/perplexity": 50.0 + s})
    records.append({"step": 50, "kind": "event", "event": "stage", "stage": 1, "name": "hard"})
    return records


def test_each_metric_goes_to_one_figure():
    records = _records_of_a_recursive_model()
    keys = figure_keys(series_of(records, "train"), series_of(records, "val"))
    assert keys["loss_train"] == ["train/loss"] and keys["loss_val"] == ["val/loss"]  # ce == loss: one line
    assert keys["val_metrics"] == ["val/acc", "val/act/steps", "val/perplexity"]  # not val/ce, a loss
    assert keys["train_metrics"] == ["train/act/steps"]  # a model metric, not a loss term
    assert keys["grad_norm"] == ["train/grad_norm"] and keys["lr"] == ["lr/main"]


def test_validation_metrics_get_a_panel_each_with_its_own_axis_and_the_stage_line(tmp_path):
    records = _records_of_a_recursive_model()
    val = series_of(records, "val")
    fig = metric_panels("validation metrics", ["val/acc", "val/act/steps", "val/perplexity", "val/ce"], val, [(50, "hard")])
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["val/acc", "val/act/steps", "val/perplexity", "val/ce"]
    assert len(fig.axes) == 6  # a 2 x 3 grid, the last two slots hidden
    limits = {ax.get_title(): ax.get_ylim() for ax in panels}
    assert limits["val/acc"][0] < 0.1 and limits["val/acc"][1] < 1.1  # 0.1 .. 1.0, not squashed by perplexity's 60+
    assert limits["val/perplexity"][0] > 50 and limits["val/ce"][1] < 0.5
    for ax in panels:  # the stage change is marked on every panel
        assert any(list(line.get_xdata()) == [50, 50] for line in ax.get_lines()), ax.get_title()
    # Every column's lowest panel is labelled "step" (the grid shares the x axis).
    assert [ax.get_xlabel() for ax in panels] == ["", "step", "step", "step"]


# -------------------------------------------------------------------------------------------- progress
def test_no_progress_bar_without_a_terminal_but_periodic_step_lines(runs):
    err = runs["first"]["stderr"]
    assert "it/s" not in err and "step/s" not in err and "%|" not in err, err[-3000:]
    steps = re.findall(r"utils\.training\.trainer: step (\d+)  loss=", err)
    assert steps == [str(s) for s in range(1, 7)], err[-3000:]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_replaces_step_lines_on_the_console():
    term = _Terminal()
    handler = logging.StreamHandler(term)
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    try:
        with Progress(10, initial=2, stream=term, desc="job") as progress:
            assert progress.active
            progress.update(3)
            progress.set_metrics({"train/loss": 1.25, "lr/main": 3e-4, "time/samples_per_s": 900.0})
            progress.update()
            logging.getLogger("t").info("step 6  train/loss=1.25", extra={PROGRESS_LINE: True})
            logging.getLogger("t").info("evaluated")
        assert handler in root.handlers  # the console handler is back after the bar
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    text = term.getvalue()
    assert "job" in text and "step/s" in text and "loss=1.25" in text and "6/10" in text, text
    assert "evaluated" in text and "step 6  train/loss" not in text, text
    quiet = _Terminal()
    with Progress(10, stream=quiet, enabled=False) as progress:  # rank != 0
        progress.update()
    assert quiet.getvalue() == "" and not Progress(10, stream=io.StringIO()).active


# ------------------------------------------------------------------------------------------------ config
def test_logger_group_options_compose():
    assert dict(compose_config("logger=[wandb,tensorboard]").logger).keys() == {"wandb", "tensorboard"}
    assert compose_config("logger=jsonl").logger == {}
    assert compose_config("debug=fast").logger == {}  # debug=fast: no tracker
    assert list(compose_config("debug=fast", "logger=wandb").logger) == ["wandb"]
