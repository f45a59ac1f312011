"""Cogment's parts, each against its own ablation, measured with experiment=cogment_tiny on the CPU.

    python -m bench.cogment                       # every part (16 min for the first parts, then three
                                                  # 1,000-step single-task runs of 5-6 min each, 2 loaded cores)
    python -m bench.cogment --parts memory act    # some of them
    python -m bench.cogment --quick               # a quarter of the steps (a smoke run; numbers mean little)

Every run is a real launcher run (utils.training.api.train) of one stage of conf/curriculum/cogment_tiny.yaml,
with that stage's data, batch size, refinement steps, Grokfast setting, memory-write rate and loss weights,
from freshly initialised weights; what a part changes is listed with it.

  sanity      stage 0 as configured: exact accuracy on the synthetic linear maps where the stage ends
              (its criterion is >= 0.8; the budget is 500 steps).
  grokfast    stage 2 (Sudoku 4x4, mazes 7x7, ListOps) with the selective Grokfast filter against
              without (grad_filter none for the stage): steps to the stage's criterion (exact_acc >= 0.7)
              and to lower levels of exact accuracy, and their ratio. The stage's plateau rule is switched
              off so each run goes on until the criterion or the budget.
  grokfast_sanity  the same comparison where a criterion is in reach: stage 0 (as configured, without a
              filter) against stage 0 with the experiment's selective filter (grad_filter inherit), at the
              stage's learning rates (lr_scale 7.5) and at the base rates of the filtered stages, an
              evaluation every 25 steps: steps to the stage's criterion (linear maps >= 0.8) and their ratio.
  refinement  the two stage-2 models: exact and token accuracy of the prediction after each refinement
              step, on ListOps and on the mazes (held-out rows); is the last step better than the first?
  refinement_single  stage 2's refinement part trained on one task at a time (ListOps of depth 2 alone,
              then the 7x7 mazes alone, 64 tokens, batch 16), its 8 refinement steps, deep supervision
              (decay 0.5) and residual-improvement loss, with ponder cost 0 and no Grokfast filter (ACT has
              no reason to stop early, and the filter does not enter), 1,000 steps, plateau rule and
              criterion off: exact and token accuracy after every refinement step on the whole validation
              set (every step's prediction is computed whatever ACT decides), the ACT mixture's exact
              accuracy and the mean ponder steps.
  grokfast_listops  the ListOps run of refinement_single against the same run with the selective filter
              (grad_filter inherit), at stage 2's learning rates and at those rates divided by 1 + lambda
              for the filtered optimizers (FILTER_LR_SCALE): steps to levels 0.2 .. 0.9 of exact
              accuracy, evaluated every 50 steps, and their ratios.
  act         ListOps only (depth 2), stage 2's 8 refinement steps, ponder cost 0.001 / 0.01 / 0.05 / 0.2:
              mean ponder steps on held-out rows; do they fall as the cost rises, and stay <= 8?
  memory      passkey retrieval across contexts (passkey_memory: 256 documents, 4-digit passkeys; training
              sees 128 of them, validation asks for the passkeys of the other 128, never seen in training,
              without their document, after the memory wrote the document), stage 4 with 2 refinement
              steps and batch 8 instead of 2 (for speed), up to 800 steps (the stage ends on its
              criterion), memory writes at 0.15 against 0: recall of the held-out passkeys, chance 1e-4.
  stage4_tasks  (not in the default set: about 65 min on one core) why recall stays at 0 when stage 4 is
              trained as configured: stage 4 (6 refinement steps, batch 8 instead of 2, no filter, its
              loss weights and write rate, plateau rule off) on one of its tasks at a time, at the stage's
              256 tokens and at 64, criterion off: the in-context passkey at 256 and 64 tokens and
              passkey_memory at 256 for 600 steps, the stage's three tasks mixed (the reference), then
              the passkey at 256 for 2,000 and at 64 for 3,000 (the schedule stretched over the longer
              budget). Exact and per-digit accuracy and ponder steps every 100 steps. If a task learns
              alone at 64 tokens but not at 256, the length is what stops it, not the mixture.
  grokfast_memorise  (not in the default set: about 16 min on one core) Grokfast where the paper says it
              helps, a model that memorises long before it generalises: stage 0 on the linear maps alone
              with only 64 training rows, weight decay 1.0 on every optimizer, the base learning rates,
              8,000 steps (the cosine schedule over them), criterion and plateau off, an evaluation every
              50 steps; with the selective filter (grad_filter inherit) against without: the step at which
              training exact accuracy reaches 0.99, validation exact accuracy over time and the steps to
              its levels.

The report prints every figure, the wall time of each part and the load average (other processes on the
same cores slow the runs down; step counts do not change). --out writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, open_dict

from utils.training.api import TrainResult, compose, train

STAGES = {"sanity": 0, "arc_visual": 1, "algorithmic": 2, "math_text": 3, "long_context": 4}
LEVELS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7)  # the criterion (0.7) and lower marks, for short runs


def stage_config(stage: str, root: Path, run_name: str, overrides: list[str] = ()) -> DictConfig:
    """experiment=cogment_tiny reduced to one stage of its curriculum."""
    cfg = compose(["experiment=cogment_tiny", "trainer.device=cpu", f"paths.root={root}",
                   f"paths.data_root={root / 'datasets'}", f"run_name={run_name}", "trainer.log_interval=50",
                   "trainer.checkpoint.interval=100000", *overrides], validate=False)
    with open_dict(cfg):
        cfg.curriculum.stages = [cfg.curriculum.stages[STAGES[stage]]]
        cfg.trainer.max_steps = int(cfg.curriculum.stages[0].max_steps)
    return cfg


def run(cfg: DictConfig) -> tuple[TrainResult, float]:
    start = time.perf_counter()
    result = train(cfg, fresh=True)
    return result, time.perf_counter() - start


def first_step_at(history: list[dict[str, float]], key: str, level: float) -> int | None:
    return next((int(h["step"]) for h in history if h.get(key, -math.inf) >= level), None)


@torch.no_grad()
def accuracy_per_step(result: TrainResult, tasks: list[str]) -> dict[str, dict[str, list[float]]]:
    """Exact and token accuracy of each refinement step's prediction, per task, over the whole val set."""
    trainer = result.trainer
    model, data = trainer.model.eval(), trainer.data
    names = data.model_kwargs()["task_names"]
    sums: dict[str, dict[str, Any]] = {t: {"rows": 0, "tokens": 0, "exact": None, "correct": None} for t in tasks}
    for start in range(0, len(data.val_dataset), 64):
        batch = data.collate_fn(data.val_dataset.__getitems__(list(range(start, min(start + 64, len(data.val_dataset))))))
        out = model(batch)
        labels, scored = batch["labels"], batch["labels"] != -100
        for task in tasks:
            rows = batch["task_type"] == names.index(task)
            if not rows.any():
                continue
            s = sums[task]
            s["rows"] += int(rows.sum())
            s["tokens"] += int(scored[rows].sum())
            exact, correct = [], []
            for logits in out["step_logits"]:
                right = (logits.argmax(-1) == labels) & scored
                exact.append(int(((right | ~scored).all(1) & rows).sum()))
                correct.append(int((right & rows.unsqueeze(1)).sum()))
            s["exact"] = exact if s["exact"] is None else [a + b for a, b in zip(s["exact"], exact)]
            s["correct"] = correct if s["correct"] is None else [a + b for a, b in zip(s["correct"], correct)]
    return {t: {"exact": [e / s["rows"] for e in s["exact"]], "token": [c / s["tokens"] for c in s["correct"]],
                "rows": s["rows"]} for t, s in sums.items() if s["rows"]}


# ------------------------------------------------------------------------------------------ the parts
def part_sanity(root: Path, scale: float) -> dict[str, Any]:
    cfg = stage_config("sanity", root, "bench_sanity")
    with open_dict(cfg):
        cfg.curriculum.stages[0].max_steps = cfg.trainer.max_steps = max(20, int(500 * scale))
    result, seconds = run(cfg)
    last = result.history[-1]
    return {"steps": result.trainer.state.step, "ended": result.trainer.state.stop_reason,
            "linear_map_exact": last["val/exact_acc/linear_map"], "maze_exact": last["val/exact_acc/maze"],
            "steps_to_0.8": first_step_at(result.history, "val/exact_acc/linear_map", 0.8), "seconds": seconds}


def part_grokfast(root: Path, scale: float) -> tuple[dict[str, Any], dict[str, TrainResult]]:
    out, models = {}, {}
    for variant in ("selective", "none"):
        cfg = stage_config("algorithmic", root, f"bench_grokfast_{variant}",
                           ["trainer.eval_interval=25", "trainer.eval_max_batches=4", "trainer.eval_batch_size=32"])
        with open_dict(cfg):
            stage = cfg.curriculum.stages[0]
            stage.max_steps = cfg.trainer.max_steps = max(40, int(600 * scale))
            if variant == "none":
                stage.grad_filter = "none"
            cfg.evaluators.stage.stages.algorithmic.patience = 10**6  # criterion or budget, no plateau
        result, seconds = run(cfg)
        history = result.history
        out[variant] = {"steps": result.trainer.state.step, "seconds": seconds,
                        "best_exact": max(h["val/exact_acc"] for h in history),
                        "last_exact": history[-1]["val/exact_acc"],
                        "steps_to": {str(level): first_step_at(history, "val/exact_acc", level) for level in LEVELS}}
        models[variant] = result
    ratios = {}
    for level in map(str, LEVELS):
        with_filter, without = out["selective"]["steps_to"][level], out["none"]["steps_to"][level]
        if with_filter and without:
            ratios[level] = without / with_filter
    out["ratio_steps_without_over_with"] = ratios
    return out, models


def part_grokfast_sanity(root: Path, scale: float) -> dict[str, Any]:
    """Stage 0 with and without the selective filter, at the stage's learning rates (lr_scale 7.5) and at
    the experiment's base rates (lr_scale 1, those of the filtered stages)."""
    out: dict[str, Any] = {}
    for lr in ("stage", "base"):
        runs: dict[str, Any] = {}
        for variant in ("selective", "none"):
            cfg = stage_config("sanity", root, f"bench_grokfast_sanity_{lr}_{variant}", ["trainer.eval_interval=25"])
            with open_dict(cfg):
                stage = cfg.curriculum.stages[0]
                stage.max_steps = cfg.trainer.max_steps = max(20, int(500 * scale))
                if variant == "selective":
                    stage.grad_filter = "inherit"
                if lr == "base":
                    stage.lr_scale = {}
                cfg.evaluators.stage.stages.sanity.patience = 10**6  # criterion or budget, no plateau
            result, seconds = run(cfg)
            runs[variant] = {"steps": result.trainer.state.step, "seconds": seconds,
                             "best_exact": max(h["val/exact_acc/linear_map"] for h in result.history),
                             "steps_to_0.8": first_step_at(result.history, "val/exact_acc/linear_map", 0.8)}
        with_filter, without = runs["selective"]["steps_to_0.8"], runs["none"]["steps_to_0.8"]
        runs["ratio_steps_without_over_with"] = without / with_filter if with_filter and without else None
        out[lr] = runs
    return out


def part_refinement(models: dict[str, TrainResult]) -> dict[str, Any]:
    return {variant: accuracy_per_step(result, ["listops", "maze", "sudoku"]) for variant, result in models.items()}


# One task at a time, at a length where the tiny model learns within CPU minutes: ListOps of depth 2
# (stage 2 has depth 3 in 128 tokens) and stage 2's 7x7 mazes, both in 64 tokens.
SINGLE_TASKS = {"listops": {"listops": {"max_depth": 2, "max_args": 4}}, "maze": {"maze": {"size": 7, "min_path_length": 4}}}
SINGLE_STEPS = 1000
SINGLE_LEVELS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
_single_runs: dict[tuple[str, str, str], tuple[TrainResult, float]] = {}
# Grokfast adds lambda times the slow (EMA) gradient: where the gradient is mostly that slow part, Adam's
# step in it grows by up to 1 + lambda. These factors take the filtered optimizers' rates down by that much
# (core lambda 2.0, memory 1.5; halting is never filtered).
FILTER_LR_SCALE = {"main": 1 / 3, "core": 1 / 3, "memory": 1 / 2.5, "halting": 1.0}


def single_task_run(root: Path, scale: float, task: str, grokfast: str,
                    lr_scale: dict[str, float] | None = None) -> tuple[TrainResult, float]:
    """Stage 2 (batch 16 instead of 6) on ``task`` alone, 8 refinement steps, deep supervision and the
    residual-improvement loss as configured, ponder cost 0, consistency off; ``grokfast`` is the stage's
    grad_filter (none or inherit: the selective filter). Evaluations every 50 steps on 128 held-out rows,
    the plateau rule and the criterion off: every run trains its whole budget. Runs are shared by parts."""
    key = (task, grokfast, json.dumps(lr_scale))
    if key not in _single_runs:
        cfg = stage_config("algorithmic", root, f"bench_single_{task}_{grokfast}{'_lr' if lr_scale else ''}",
                           ["trainer.eval_interval=50", "trainer.eval_max_batches=4", "trainer.eval_batch_size=32"])
        with open_dict(cfg):
            stage = cfg.curriculum.stages[0]
            stage.max_steps = cfg.trainer.max_steps = max(40, int(SINGLE_STEPS * scale))
            stage.batch_size = 16
            stage.data.tasks = [task]
            stage.data.seq_len = 64
            stage.data.task_options = SINGLE_TASKS[task]
            stage.grad_filter = grokfast
            if lr_scale:
                stage.lr_scale = lr_scale
            stage.loss_weights.ponder = 0.0  # ACT has no reason to stop early: every step's prediction counts
            stage.loss_weights.consistency = 0.0  # the mazes' rotated second forward doubles the cost
            cfg.evaluators.stage.stages.algorithmic.patience = 10**6
            cfg.evaluators.stage.stages.algorithmic.threshold = 2.0  # never met: train the whole budget
        _single_runs[key] = run(cfg)
    return _single_runs[key]


def part_refinement_single(root: Path, scale: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for task in SINGLE_TASKS:
        result, seconds = single_task_run(root, scale, task, "none")
        last = result.history[-1]
        out[task] = {**accuracy_per_step(result, [task])[task], "mixture_exact": last[f"val/exact_acc/{task}"],
                     "ponder_steps": last["val/ponder_steps"], "steps": result.trainer.state.step, "seconds": seconds,
                     "history_step_exact": [[int(h["step"])] + [h.get(f"val/step_exact_acc/{n}", math.nan)
                                                                for n in range(1, 9)] for h in result.history]}
    return out


def part_grokfast_listops(root: Path, scale: float) -> dict[str, Any]:
    """ListOps alone (the refinement part's run without a filter) against the same run with the selective
    filter: steps to levels of exact accuracy (the ACT mixture's) and their ratio."""
    out: dict[str, Any] = {}
    for variant, grad_filter, lr_scale in (("selective", "inherit", None), ("none", "none", None),
                                           ("selective_lr", "inherit", FILTER_LR_SCALE)):
        result, seconds = single_task_run(root, scale, "listops", grad_filter, lr_scale)
        history = result.history
        out[variant] = {"steps": result.trainer.state.step, "seconds": seconds,
                        "best_exact": max(h["val/exact_acc"] for h in history), "last_exact": history[-1]["val/exact_acc"],
                        "curve": [[int(h["step"]), round(h["val/exact_acc"], 4)] for h in history],
                        "steps_to": {str(level): first_step_at(history, "val/exact_acc", level) for level in SINGLE_LEVELS}}
    for variant in ("selective", "selective_lr"):
        out[f"ratio_steps_none_over_{variant}"] = {
            level: out["none"]["steps_to"][level] / out[variant]["steps_to"][level]
            for level in map(str, SINGLE_LEVELS) if out["none"]["steps_to"][level] and out[variant]["steps_to"][level]}
    return out


def part_act(root: Path, scale: float) -> dict[str, Any]:
    out = {}
    for cost in (0.001, 0.01, 0.05, 0.2):
        cfg = stage_config("algorithmic", root, f"bench_act_{cost}",
                           ["trainer.eval_interval=50", "trainer.eval_max_batches=4", "trainer.eval_batch_size=32"])
        with open_dict(cfg):
            stage = cfg.curriculum.stages[0]
            stage.max_steps = cfg.trainer.max_steps = max(20, int(200 * scale))
            stage.data.tasks = ["listops"]
            stage.data.seq_len = 64
            stage.data.task_options = {"listops": {"max_depth": 2, "max_args": 4}}
            stage.loss_weights.ponder = cost
            cfg.evaluators.stage.stages.algorithmic.patience = 10**6
        result, seconds = run(cfg)
        last = result.history[-1]
        out[str(cost)] = {"ponder_steps": last["val/act/ponder_steps"], "exact": last["val/exact_acc/listops"],
                          "max_steps": int(stage.model.refinement_steps), "seconds": seconds}
    return out


# Documents of passkey_memory, half of them held out. With 16 training documents the weights learn their
# passkeys and the model does not learn to trust the memory over them (measured: held-out recall 0.273 with
# writes on, 0.000 off, after 800 steps); with 128 it learns to read the memory (1.000 at step 300).
MEMORY_DOCS = 256


def part_memory(root: Path, scale: float) -> dict[str, Any]:
    out = {}
    for rate in (0.15, 0.0):
        cfg = stage_config("long_context", root, f"bench_memory_{rate}", ["trainer.eval_interval=100"])
        with open_dict(cfg):
            stage = cfg.curriculum.stages[0]
            stage.max_steps = cfg.trainer.max_steps = max(40, int(800 * scale))
            stage.batch_size = 8
            stage.data.tasks = ["passkey_memory"]
            stage.data.seq_len = 64
            stage.data.task_options = {"passkey_memory": {"docs": MEMORY_DOCS, "digits": 4, "context_length": 64}}
            stage.model.refinement_steps = 2
            stage.model.memory_write_rate = rate
            cfg.evaluators.stage.stages.long_context.patience = 10**6
        result, seconds = run(cfg)
        last = result.history[-1]
        out[str(rate)] = {"recall_exact": last["val/exact_acc/passkey_memory"],
                          "recall_tokens": last["val/token_acc/passkey_memory"],
                          "memory_found": last["val/memory/recall_rate"], "slots_used": last["val/memory/slots_used"],
                          "seconds": seconds}
    return out


# (tasks, tokens, steps); "mix" is the stage's own three tasks, the reference the single tasks compare with.
STAGE4_RUNS = (("passkey", 256, 600), ("passkey", 64, 600), ("passkey_memory", 256, 600), ("mix", 256, 600),
               ("passkey", 256, 2000), ("passkey", 64, 3000))


def part_stage4_tasks(root: Path, scale: float) -> dict[str, Any]:
    out = {}
    for name, seq_len, steps in STAGE4_RUNS:
        cfg = stage_config("long_context", root, f"bench_stage4_{name}_{seq_len}_{steps}",
                           ["trainer.eval_interval=100"])
        with open_dict(cfg):
            stage = cfg.curriculum.stages[0]
            stage.max_steps = cfg.trainer.max_steps = max(40, int(steps * scale))
            stage.batch_size = 8
            stage.grad_filter = "none"
            tasks = list(stage.data.tasks) if name == "mix" else [name]
            stage.data.tasks = tasks
            stage.data.seq_len = seq_len
            options = {task: dict(stage.data.task_options[task]) for task in tasks}
            if "passkey_memory" in options:
                options["passkey_memory"]["docs"] = MEMORY_DOCS
            stage.data.task_options = options
            cfg.evaluators.stage.stages.long_context.patience = 10**6
            cfg.evaluators.stage.stages.long_context.threshold = 2.0  # never met: train the whole budget
        result, seconds = run(cfg)
        evals = [h for h in result.history if "val/exact_acc" in h]
        out[f"{name}@{seq_len}, {steps} steps"] = {
            "steps": [int(h["step"]) for h in evals],
            "tasks": {task: {"exact": [h[f"val/exact_acc/{task}"] for h in evals],
                             "token": [h[f"val/token_acc/{task}"] for h in evals]} for task in tasks},
            "ponder": [h.get("val/act/ponder_steps", math.nan) for h in evals],
            "seconds": seconds}
    return out


MEMORISE_ROWS, MEMORISE_STEPS, MEMORISE_WEIGHT_DECAY = 64, 8000, 1.0


def part_grokfast_memorise(root: Path, scale: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    decay = MEMORISE_WEIGHT_DECAY
    for variant in ("selective", "none"):
        cfg = stage_config("sanity", root, f"bench_grokfast_memorise_{variant}", [
            "trainer.eval_interval=50", f"data.num_train={MEMORISE_ROWS}", f"optim.weight_decay={decay}",
            f"optim.components.core.weight_decay={decay}", f"optim.components.memory.weight_decay={decay}"])
        with open_dict(cfg):
            stage = cfg.curriculum.stages[0]
            stage.data.tasks = ["linear_map"]
            stage.max_steps = cfg.trainer.max_steps = max(100, int(MEMORISE_STEPS * scale))
            stage.lr_scale = {}  # the base rates, those of the filtered stages
            stage.grad_filter = "inherit" if variant == "selective" else "none"
            cfg.evaluators.stage.stages.sanity.patience = 10**6
            cfg.evaluators.stage.stages.sanity.threshold = 2.0  # never met: train the whole budget
        result, seconds = run(cfg)
        evals = [h for h in result.history if "val/exact_acc/linear_map" in h]
        out[variant] = {"steps": [int(h["step"]) for h in evals],
                        "val_exact": [h["val/exact_acc/linear_map"] for h in evals],
                        "train_exact": [h["val/train_exact_acc"] for h in evals],
                        "train_0.99_at": first_step_at(result.history, "val/train_exact_acc", 0.99),
                        "steps_to": {str(level): first_step_at(result.history, "val/exact_acc/linear_map", level)
                                     for level in (*LEVELS, 0.8, 0.9)},
                        "seconds": seconds}
    return out


# ------------------------------------------------------------------------------------------ report
def report(results: dict[str, Any]) -> None:
    print(f"\nload average at start {results['load_start']}, at end {results['load_end']}; "
          f"total {results['seconds']:.0f} s\n")
    if "sanity" in results:
        r = results["sanity"]
        print(f"sanity   linear maps exact {r['linear_map_exact']:.3f} (target >= 0.8: "
              f"{'MET' if r['linear_map_exact'] >= 0.8 else 'NOT MET'}), toy mazes exact {r['maze_exact']:.3f}; "
              f"0.8 first at step {r['steps_to_0.8']}; stage ended at step {r['steps']} ({r['ended']}); {r['seconds']:.0f} s")
    if "grokfast" in results:
        g = results["grokfast"]
        for variant in ("selective", "none"):
            r = g[variant]
            print(f"grokfast {variant:<9} best exact {r['best_exact']:.3f}, steps to " +
                  ", ".join(f"{k}: {v}" for k, v in r["steps_to"].items()) + f"  ({r['steps']} steps, {r['seconds']:.0f} s)")
        print(f"grokfast steps without / with the filter, per level: {g['ratio_steps_without_over_with'] or 'no level reached by both'}")
    if "grokfast_sanity" in results:
        for lr, g in results["grokfast_sanity"].items():
            for variant in ("selective", "none"):
                r = g[variant]
                print(f"grokfast stage 0, {lr} lr, {variant:<9} linear maps >= 0.8 at step {r['steps_to_0.8']}, best "
                      f"{r['best_exact']:.3f} ({r['steps']} steps, {r['seconds']:.0f} s)")
            print(f"grokfast stage 0, {lr} lr, steps without / with the filter: {g['ratio_steps_without_over_with']}")
    if "refinement" in results:
        for variant, tasks in results["refinement"].items():
            for task, r in tasks.items():
                print(f"refine   {variant:<9} {task:<8} exact per step " + " ".join(f"{a:.3f}" for a in r["exact"]) +
                      " | token " + " ".join(f"{a:.3f}" for a in r["token"]) +
                      f"  (last {'>' if r['exact'][-1] > r['exact'][0] else '<='} first, {r['rows']} rows)")
    if "refinement_single" in results:
        for task, r in results["refinement_single"].items():
            print(f"refine1  {task:<8} alone, {r['steps']} steps: exact per step " + " ".join(f"{a:.3f}" for a in r["exact"]) +
                  " | token " + " ".join(f"{a:.3f}" for a in r["token"]) +
                  f"  (last {'>' if r['exact'][-1] > r['exact'][0] else '<='} first; ACT mixture {r['mixture_exact']:.3f}, "
                  f"ponder {r['ponder_steps']:.2f}; {r['rows']} rows, {r['seconds']:.0f} s)")
    if "grokfast_listops" in results:
        g = results["grokfast_listops"]
        for variant in ("selective", "selective_lr", "none"):
            r = g[variant]
            print(f"grokfast ListOps alone, {variant:<12} best exact {r['best_exact']:.3f}, last {r['last_exact']:.3f}, steps to "
                  + ", ".join(f"{k}: {v}" for k, v in r["steps_to"].items()) + f"  ({r['steps']} steps, {r['seconds']:.0f} s)")
        for variant in ("selective", "selective_lr"):
            print(f"grokfast ListOps alone, steps without / with the filter ({variant}), per level: "
                  f"{g[f'ratio_steps_none_over_{variant}'] or 'no level reached by both'}")
    if "act" in results:
        for cost, r in results["act"].items():
            print(f"act      ponder cost {cost:<6} mean ponder steps {r['ponder_steps']:.3f} (max {r['max_steps']}), "
                  f"ListOps exact {r['exact']:.3f}, {r['seconds']:.0f} s")
    if "memory" in results:
        for rate, r in results["memory"].items():
            print(f"memory   write rate {rate:<5} held-out passkey recall exact {r['recall_exact']:.3f}, per digit "
                  f"{r['recall_tokens']:.3f}, memory found {r['memory_found']:.3f}, slots used {r['slots_used']:.3f}, "
                  f"{r['seconds']:.0f} s")
    if "grokfast_memorise" in results:
        for variant, r in results["grokfast_memorise"].items():
            marks = ", ".join(f"step {st}: val {v:.3f} train {t:.3f}" for st, v, t in
                              zip(r["steps"], r["val_exact"], r["train_exact"]) if st % 1000 == 0)
            print(f"memorise {variant:<9} train exact >= 0.99 at step {r['train_0.99_at']}; val exact levels "
                  + ", ".join(f"{k}: {v}" for k, v in r["steps_to"].items()) + f"; {marks}  ({r['seconds']:.0f} s)")
    if "stage4_tasks" in results:
        for run_name, r in results["stage4_tasks"].items():
            for task, acc in r["tasks"].items():
                print(f"stage4   {run_name:<27} {task:<18} " + ", ".join(
                    f"step {s}: exact {e:.3f} digit {t:.3f} ponder {p:.2f}"
                    for s, e, t, p in zip(r["steps"], acc["exact"], acc["token"], r["ponder"])) + f"  ({r['seconds']:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["sanity", "grokfast", "grokfast_sanity", "refinement",
                                                       "refinement_single", "grokfast_listops", "act", "memory"])
    parser.add_argument("--quick", action="store_true", help="a quarter of the steps")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--keep", type=Path, help="keep the run directories here (default: a temporary directory)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    scale = 0.25 if args.quick else 1.0
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_cogment_"))
    results: dict[str, Any] = {"load_start": os.getloadavg(), "scale": scale}
    start = time.perf_counter()
    try:
        if "sanity" in args.parts:
            results["sanity"] = part_sanity(root, scale)
        if "grokfast" in args.parts or "refinement" in args.parts:
            results["grokfast"], models = part_grokfast(root, scale)
            results["refinement"] = part_refinement(models)
        if "refinement_single" in args.parts:
            results["refinement_single"] = part_refinement_single(root, scale)
        if "grokfast_listops" in args.parts:
            results["grokfast_listops"] = part_grokfast_listops(root, scale)
        if "grokfast_sanity" in args.parts:
            results["grokfast_sanity"] = part_grokfast_sanity(root, scale)
        if "act" in args.parts:
            results["act"] = part_act(root, scale)
        if "memory" in args.parts:
            results["memory"] = part_memory(root, scale)
        if "stage4_tasks" in args.parts:
            results["stage4_tasks"] = part_stage4_tasks(root, scale)
        if "grokfast_memorise" in args.parts:
            results["grokfast_memorise"] = part_grokfast_memorise(root, scale)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    results["seconds"] = time.perf_counter() - start
    results["load_end"] = os.getloadavg()
    report(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
