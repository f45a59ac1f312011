"""Numerical sanity check of one LPL layer on random data: the first thing to run when training diverges.

    python -m models.lpl.sanity_check                       # 5,000 steps, the seed's learning rates
    python -m models.lpl.sanity_check --lr-hebb 0.01 --steps 2000 --input-dim 3072

It trains a single layer (models/lpl/network.py) with the same rule and the same stability mechanisms
as the launcher's presets, but in a plain loop with nothing else around it: random inputs in [0, 1] and
their temporally correlated partner (the same input plus small noise), the update norm clipped to
`--max-update-norm`, weights clamped to [-5, 5] (`--weight-clip`). Every `--every` steps it prints
the weight norm, the activation variance and the mean per-unit std, and checks for NaN/inf. It exits 0
when the run stayed finite, 1 (with a warning naming the step) at the first NaN or inf.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

import torch

from models.lpl.network import LPLNetwork


def random_pairs(batch_size: int, input_dim: int, noise: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """x(t - dt) uniform in [0, 1]; x(t) = x(t - dt) + noise, clipped to [0, 1]."""
    previous = torch.rand(batch_size, input_dim, generator=generator)
    current = (previous + noise * torch.randn(batch_size, input_dim, generator=generator)).clamp(0.0, 1.0)
    return {"x1": previous, "x2": current}


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = LPLNetwork(args.input_dim, [args.output_dim], lr_pred=args.lr_pred, lr_hebb=args.lr_hebb,
                       lr_stab=args.lr_stab, epsilon=args.epsilon, init_std=args.init_std)
    parameter = model.layers[0].weight
    weight = parameter.detach()  # the same storage, updated in place as an optimizer would
    print(f"LPL sanity check: {args.input_dim} -> {args.output_dim}, lr_pred={args.lr_pred} lr_hebb={args.lr_hebb} "
          f"lr_stab={args.lr_stab}, batch {args.batch_size}, {args.steps} steps")
    for step in range(1, args.steps + 1):
        batch = random_pairs(args.batch_size, args.input_dim, args.noise, generator)
        with torch.no_grad():
            outputs = model(batch)
            model.local_update(batch, outputs)
            update = -parameter.grad
            update_norm = float(update.norm())
            finite = math.isfinite(update_norm) and bool(torch.isfinite(outputs["layer_outputs"][0]).all())
            if finite:
                update *= min(1.0, args.max_update_norm / (update_norm + 1e-6))  # update-norm clipping
                weight += update
                weight.clamp_(-args.weight_clip, args.weight_clip)  # weight clipping
            parameter.grad = None
        if not finite or not bool(torch.isfinite(weight).all()):
            print(f"WARNING: NaN or inf at step {step} (update norm {update_norm}); stopping. Lower the learning "
                  "rates or raise --epsilon.", file=sys.stderr)
            return 1
        if step % args.every == 0 or step == args.steps:
            out = outputs["layer_outputs"][0]
            std = out.std(dim=0)
            print(f"step {step:6d}  weight norm {float(weight.norm()):9.4f}  activation variance "
                  f"{float(out.var(dim=0).mean()):9.5f}  mean unit std {float(std.mean()):7.4f}  "
                  f"collapsed units (std < 0.1) {int((std < 0.1).sum()):4d}  update norm {update_norm:8.4g}  NaN: no")
    print("No NaN or inf: the rule is numerically stable with these settings.")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--every", type=int, default=500, help="print diagnostics every this many steps")
    parser.add_argument("--input-dim", type=int, default=1024)
    parser.add_argument("--output-dim", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--noise", type=float, default=0.05, help="std of the change between the two frames")
    parser.add_argument("--lr-pred", type=float, default=0.001)
    parser.add_argument("--lr-hebb", type=float, default=0.001)
    parser.add_argument("--lr-stab", type=float, default=0.0005)
    parser.add_argument("--epsilon", type=float, default=1e-4)
    parser.add_argument("--init-std", type=float, default=None, help="default: 1 / sqrt(input dim)")
    parser.add_argument("--max-update-norm", type=float, default=1.0)
    parser.add_argument("--weight-clip", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.every < 1 or args.batch_size < 2:
        parser.error("--steps and --every must be >= 1, --batch-size >= 2")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
