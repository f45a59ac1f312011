"""Start-up: time to the first training step, the launcher against a plain script, side by side.

    python -m bench.startup [--rounds 5] [hydra overrides ...]

Each round starts, one after the other in alternating order, fresh processes of

  plain       a script that imports torch, builds the same model (the composed config's model class and
              arguments) and the same optimizer (torch.optim.Adam with the config's settings), and takes
              one step on a random batch of the same shape: what a user writes by hand;
  pretrain    `python pretrain.py debug=fast trainer.max_steps=1 trainer.log_interval=1 logger=none` in a
              fresh run directory (the dataset is built once before the first round);
  train       the same through `python train.py` (pre-flight checks, then it hands off to pretrain.py).

Each is timed from the parent's Popen to the line that says its first step is done ("step 1  loss=..."
for the launcher), and to its exit (the launcher then evaluates, checkpoints and draws its figures).
The report gives the median of each over the rounds and the launcher's difference to the plain script
per round (median), which is the figure the goal is about: first step within plain + 1 s.
Every process runs with one intra-op thread (OMP_NUM_THREADS=1), as the grokking presets do.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_ARGS = ["debug=fast", "trainer.max_steps=1", "trainer.log_interval=1", "logger=none", "trainer.device=cpu"]

# The hand-written side. It reads its model and optimizer settings from argv[1] (JSON) so that it builds
# exactly what the launcher builds, without importing anything of the launcher but the model class.
PLAIN = """
import importlib, json, sys
spec = json.loads(sys.argv[1])
import torch
import torch.nn.functional as F
torch.manual_seed(0)
module, name = spec["model_target"].rsplit(".", 1)
model = getattr(importlib.import_module(module), name)(**spec["model_kwargs"])
opt = torch.optim.Adam(model.parameters(), **spec["optim_kwargs"])
inputs = torch.randint(0, spec["model_kwargs"]["vocab_size"], (spec["batch"], spec["model_kwargs"]["seq_len"]))
targets = torch.randint(0, spec["num_classes"], (spec["batch"],))
loss = F.cross_entropy(model({"inputs": inputs})["logits"], targets)
loss.backward()
opt.step()
print(f"first step done, loss={loss.item():.3f}", flush=True)
"""


def plain_spec(overrides: list[str]) -> dict:
    """The model and optimizer the launcher builds for `overrides`, as constructor arguments."""
    from hydra.utils import instantiate

    from utils.training.api import compose

    cfg = compose([*LAUNCHER_ARGS, *overrides])
    if cfg.optim._target_ != "torch.optim.Adam":
        raise SystemExit(f"bench.startup builds torch.optim.Adam by hand; this config uses {cfg.optim._target_}")
    model = OmegaConf.to_container(cfg.model, resolve=True)
    target = model.pop("_target_")
    # The trainer's rule: the data module's facts fill the constructor arguments the model config leaves out.
    facts = instantiate(cfg.data).model_kwargs()
    model = {**{k: v for k, v in facts.items() if k not in model}, **model}
    optim = {k: v for k, v in OmegaConf.to_container(cfg.optim, resolve=True).items()
             if k in ("lr", "weight_decay", "betas", "eps")}
    return {"model_target": target, "model_kwargs": model, "optim_kwargs": optim,
            "batch": int(cfg.trainer.global_batch_size), "num_classes": int(facts["num_classes"])}


def timed(cmd: list[str], marker: str, env: dict[str, str]) -> tuple[float, float]:
    """(seconds to the first output line containing `marker`, seconds to exit)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    first = None
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if first is None and marker in line:
            first = time.perf_counter() - start
    proc.wait()
    total = time.perf_counter() - start
    if proc.returncode != 0 or first is None:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{''.join(lines[-20:])}")
    return first, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args, overrides = parser.parse_known_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "TQDM_DISABLE": "1"}
    spec = plain_spec(overrides)
    work = Path(tempfile.mkdtemp(prefix="bench_startup_"))
    python = sys.executable
    try:
        data = work / "datasets"
        launcher = [*LAUNCHER_ARGS, f"paths.data_root={data}", *overrides]
        timed([python, "train.py", "--dataset-only", *launcher, f"paths.root={work / 'warm'}"], "dataset ready", env)
        sides = {
            "plain": lambda r: timed([python, "-c", PLAIN, json.dumps(spec)], "first step done", env),
            "pretrain": lambda r: timed([python, "pretrain.py", *launcher, f"paths.root={work / f'p{r}'}"],
                                        "step 1  loss=", env),
            "train": lambda r: timed([python, "train.py", *launcher, f"paths.root={work / f't{r}'}"],
                                     "step 1  loss=", env),
        }
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
        for r in range(args.rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for name in order:
                results[name].append(sides[name](r))
            print(f"round {r}: " + "  ".join(f"{n} {results[n][-1][0]:.2f}/{results[n][-1][1]:.2f} s" for n in sides),
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nTime to the first training step / to exit (median of {args.rounds} rounds; one thread; "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}):")
    for name, runs in results.items():
        first = statistics.median(f for f, _ in runs)
        total = statistics.median(t for _, t in runs)
        line = f"  {name:<9} first step {first:5.2f} s   exit {total:5.2f} s"
        if name != "plain":
            diff = statistics.median(f - p for (f, _), (p, _) in zip(runs, results["plain"]))
            line += f"   first step - plain: {diff:+.2f} s (goal <= +1.00 s)"
        print(line)


if __name__ == "__main__":
    main()
