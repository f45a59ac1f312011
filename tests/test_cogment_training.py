"""The Cogment curriculum through the real CLI: all five stages run in order, a stage ends on the
StageEvaluator's verdict (val/stage_complete) or its budget, the memory is written only in the stages that
write, and a run killed with SIGKILL in the middle of a stage and, once resumed, killed again right at a
stage boundary, ends bitwise identical to the uninterrupted run (weights, four optimizers, schedules, Grokfast state, the memory's slots, the
evaluator's convergence history, RNG streams).

The curriculum is experiment=cogment_tiny with a few steps per stage, a narrower model and small datasets;
stage 0 ends on its accuracy threshold (set to 0), stage 3 on its plateau (patience 1), the others on budget.
Both kills are in one run so the default test set stays near a minute (each launch costs ~7 s of start-up).
"""

from __future__ import annotations

import math
import random
import signal
from pathlib import Path

import pytest

from tests.cli_helpers import CPU, assert_tensors_equal, finish, load, paths, run, start, wait_for
from utils.monitoring.plots import read_records

BUDGETS = [4, 2, 4, 6, 2]
MICRO = [
    "experiment=cogment_tiny", CPU,
    *[f"curriculum.stages.{i}.max_steps={n}" for i, n in enumerate(BUDGETS)],
    "evaluators.stage.stages.sanity.threshold=0.0",  # stage 0 passes its criterion at its first evaluation
    # Stage 3 converges at its second evaluation: no change counts as a gain (min_delta 100), patience 1, and
    # no train/val gap can lengthen the patience (max_gap 1): it ends on its plateau, 2 steps before its budget.
    "evaluators.stage.stages.math_text.patience=1", "+evaluators.stage.stages.math_text.min_delta=100",
    "+evaluators.stage.stages.math_text.max_gap=1.0",
    "trainer.max_steps=100", "trainer.eval_interval=2", "trainer.eval_max_batches=1", "trainer.eval_batch_size=8",
    "trainer.log_interval=1", "trainer.checkpoint.interval=1", "schedule.warmup_steps=2",
    "optim.components.halting.schedule.warmup_steps=2",
    "data.num_train=48", "data.num_val=8", "model.hidden_size=32", "model.num_heads=2", "model.episodic_slots=128",
]


def _comparable(ckpt: dict) -> dict:
    out = {k: v for k, v in ckpt.items() if k not in ("config", "logger_run_ids")}
    out["config"] = {k: v for k, v in ckpt["config"].items() if k != "paths"}
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The uninterrupted micro curriculum (a checkpoint every step, so a kill can land anywhere)."""
    base = tmp_path_factory.mktemp("cogment")
    data = base / "ds"
    result = run("train.py", *MICRO, *paths(base / "reference", data), timeout=400)
    assert result.returncode == 0, result
    return base / "reference" / "cogment_tiny", data


def test_the_curriculum_runs_every_stage_and_advances_on_the_evaluator_or_the_budget(reference) -> None:
    run_dir, _ = reference
    records = read_records(run_dir)
    ends = [r for r in records if r.get("event") == "stage_end"]
    assert [e["name"] for e in ends] == ["sanity", "arc_visual", "algorithmic", "math_text", "long_context"]
    assert ends[0]["step"] == 2 and "val/stage_complete >= 1.0" in ends[0]["reason"]  # its criterion, not its budget
    assert ends[3]["step"] == 12 and "val/stage_complete >= 1.0" in ends[3]["reason"]  # its plateau, not its budget
    assert all("budget" in ends[i]["reason"] for i in (1, 2, 4))
    steps = [e["step"] for e in ends]
    assert steps == [2, 4, 8, 12, 14]
    at = {r["step"]: r for r in records if r.get("kind") == "val"}
    assert (at[2]["val/criterion_met"], at[2]["val/plateaued"]) == (1.0, 0.0)  # stage 0: the threshold fired
    assert (at[10]["val/stage_complete"], at[10]["val/plateaued"]) == (0.0, 0.0)  # stage 3's first evaluation...
    assert (at[12]["val/criterion_met"], at[12]["val/plateaued"]) == (0.0, 1.0)  # ...its second: the plateau
    stops = [r for r in records if r.get("event") == "stop"]
    assert stops[-1]["reason"].startswith("curriculum finished")
    stage_of = lambda step: sum(step > s for s in steps[:-1])  # noqa: E731
    evaluations = [r for r in records if r.get("kind") == "val"]
    refinement = [2, 4, 8, 8, 6]
    for r in evaluations:
        stage = stage_of(r["step"])
        assert 1 <= r["val/act/ponder_steps"] <= refinement[stage]  # ACT stays within the stage's budget
        assert r[f"val/step_exact_acc/{refinement[stage]}"] >= 0  # every refinement step is scored
        assert (r["val/memory/slots_used"] > 0) == (stage >= 2 and r["step"] > steps[1])  # read-only in stages 0-1
    log = (run_dir / "train.log").read_text("utf-8")
    assert "Cogment parameters: total" in log and "budget               within 25M" in log


def _latest_is(run_dir: Path, step: int) -> bool:
    """latest.pt is complete and is the checkpoint of `step` (its digest sidecar matches the step file's)."""
    def digest(name: str) -> str | None:
        try:
            return (run_dir / f"{name}.sha256").read_text("utf-8").split()[0]
        except (OSError, IndexError):
            return None
    wanted = digest(f"step_{step:08d}.pt")
    return wanted is not None and digest("latest.pt") == wanted


def _start_and_kill(root: Path, data: Path, kill_at: int) -> None:
    """Start (or resume) the micro curriculum and SIGKILL it once latest.pt is the checkpoint of `kill_at`
    (the step file alone is not enough: a kill before latest.pt is replaced resumes a step earlier)."""
    proc = start("train.py", *MICRO, *paths(root, data))
    wait_for(lambda: _latest_is(root / "cogment_tiny", kill_at), timeout=300, what=f"the checkpoint of step {kill_at}",
             proc=proc, poll_s=0.001)
    proc.send_signal(signal.SIGKILL)
    killed = finish(proc)
    assert killed.returncode == -signal.SIGKILL, f"finished before the kill at step {kill_at}\n{killed}"


def test_sigkill_in_a_stage_and_at_its_boundary_resumes_bitwise(reference, tmp_path: Path) -> None:
    run_dir_ref, data = reference
    # The algorithmic stage (steps 5-8, the first that writes to memory): killed at a random step inside it,
    # resumed, and killed again at its last step (the checkpoint that ends the stage), then run to the end.
    mid = random.Random(20261202).randint(5, 7)
    root = tmp_path / "ck"
    _start_and_kill(root, data, mid)
    _start_and_kill(root, data, 8)
    rerun = run("train.py", *MICRO, *paths(root, data), timeout=400)
    assert rerun.returncode == 0, rerun
    assert "Resumed from" in rerun.output, rerun
    run_dir = root / "cogment_tiny"
    starts = [r["resumed_from_step"] for r in read_records(run_dir) if r.get("event") == "start"]
    assert starts == [0, mid, 8]
    final_ref, final = load(run_dir_ref / "latest.pt"), load(run_dir / "latest.pt")
    assert final["train_state"]["stage"] == 4
    assert final["model"]["memory.episodic.slot_mass"].gt(0).any()
    assert assert_tensors_equal(_comparable(final_ref), _comparable(final), f"latest.pt (killed at {mid} and 8)") > 50
    ends = lambda d: [(r["step"], r["name"]) for r in read_records(d) if r.get("event") == "stage_end"]  # noqa: E731
    assert ends(run_dir) == ends(run_dir_ref)


@pytest.mark.slow
def test_the_full_preset_reports_its_budget_and_trains_a_few_steps_on_cpu(tmp_path: Path) -> None:
    """experiment=cogment at the seed's shapes (21M parameters): 3 steps of stage 0 on the CPU, evaluated."""
    result = run("train.py", "experiment=cogment", CPU, "trainer.precision=fp32", "trainer.max_steps=3",
                 "trainer.eval_interval=3", "trainer.eval_max_batches=1", "trainer.eval_batch_size=8",
                 "trainer.log_interval=1", "trainer.checkpoint.interval=3", "data.num_train=64", "data.num_val=8",
                 *paths(tmp_path / "runs", tmp_path / "ds"), timeout=900)
    assert result.returncode == 0, result
    lines = dict(line.split("Cogment parameters: ", 1)[1].split(None, 1) for line in result.output.splitlines()
                 if "Cogment parameters: " in line)
    planned = {"refinement_core": 6.80, "gated_ltm": 2.40, "heads_and_adapters": 11.90, "total": 21.13}
    for name, seed_m in planned.items():
        have = float(lines[name].split("M", 1)[0])
        assert abs(have - seed_m) / seed_m < 0.02, (name, have, seed_m)
    assert lines["budget"].strip() == "within 25M"
    records = read_records(tmp_path / "runs" / "cogment")
    losses = [r["train/loss"] for r in records if r.get("kind") == "train" and "train/loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert [r["step"] for r in records if r.get("kind") == "val"] == [3]
