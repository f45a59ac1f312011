"""The Grokfast experiment as one plain PyTorch script, with no launcher code at all.

    python -m bench.grokfast_plain --variant ma --seed 0

bench/grokfast.py runs it side by side with the launcher (`--loops launcher plain`): the same task and
hyper-parameters written a second, independent way, so a gap between the two is the launcher's and not
the seed's. Everything here is written out by hand on purpose (nn.MultiheadAttention, torch.split
batches, the filters inline): sharing the launcher's model, data or filter code would hide the very
differences the comparison is for.

The setup (Lee et al. 2024, after Power et al. 2022): x * y mod p for p = 97, x in 0..96, y in 1..96
(the reference script's task; --operation div for x / y), as the tokens [x, op, y, =]; half the table for training, drawn by the seed; a 2-layer width-128
decoder whose block normalises its input (x = ln(x); x = x + attn(x); x = x + mlp(ln(x))), PyTorch's
default initialisation, a bias-free head over all p + 2 tokens; batch 512 with each epoch's last,
shorter batch kept; Adam lr 1e-3, betas (0.9, 0.98), coupled L2 weight decay, linear warm-up over
10 steps. Prints one JSON line: {"variant", "seed", "steps"} (steps: the first evaluation at or above
the target, or null).
"""

from __future__ import annotations

import argparse
import json
from collections import deque

import torch
import torch.nn.functional as F
from torch import nn

P = 97
SETTINGS = {  # weight decay and filter per variant, as in bench/grokfast.py
    "baseline": {"weight_decay": 0.0},
    "ema": {"weight_decay": 0.005, "alpha": 0.98, "lamb": 2.0},
    "ma": {"weight_decay": 0.01, "window": 100, "lamb": 5.0},
}


class PlainBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        x = self.norm_in(x)
        x = x + self.attention(x, x, x, attn_mask=causal, need_weights=False)[0]
        return x + self.mlp(self.norm_mlp(x))


class PlainDecoder(nn.Module):
    def __init__(self, vocab: int, length: int, width: int = 128, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(length, width)
        self.blocks = nn.ModuleList(PlainBlock(width, heads) for _ in range(layers))
        self.norm_out = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.register_buffer("causal", torch.triu(torch.full((length, length), float("-inf")), diagonal=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tokens(x) + self.positions(torch.arange(x.shape[1]))
        for block in self.blocks:
            h = block(h, self.causal)
        return self.head(self.norm_out(h)[:, -1])


def equations(operation: str) -> tuple[torch.Tensor, torch.Tensor]:
    rows, answers = [], []
    for x in range(P):
        for y in range(1, P):
            rows.append([x, P, y, P + 1])
            answers.append(x * y % P if operation == "mul" else x * pow(y, P - 2, P) % P)
    return torch.tensor(rows), torch.tensor(answers)


def filter_gradients(model: nn.Module, variant: str, state: dict) -> None:
    """Grokfast's slow-gradient amplification, written out: g <- g + lamb * slow(g)."""
    cfg = SETTINGS[variant]
    for name, param in model.named_parameters():
        g = param.grad
        if variant == "ema":
            slow = state.get(name)
            slow = g.clone() if slow is None else slow * cfg["alpha"] + g * (1 - cfg["alpha"])
            state[name] = slow
            g.add_(slow, alpha=cfg["lamb"])
        elif variant == "ma":
            window = state.setdefault(name, deque(maxlen=cfg["window"]))
            window.append(g.clone())
            if len(window) == cfg["window"]:  # nothing is added until the window is full
                g.add_(torch.stack(list(window)).mean(0), alpha=cfg["lamb"])


def run(variant: str, seed: int, max_steps: int, eval_interval: int, target: float, operation: str = "mul") -> int | None:
    torch.manual_seed(seed)
    inputs, answers = equations(operation)
    model = PlainDecoder(vocab=P + 2, length=4)
    order = torch.randperm(len(answers))
    train, val = order[: len(order) // 2], order[len(order) // 2:]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.98),
                                 weight_decay=SETTINGS[variant]["weight_decay"])
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(step / 10, 1.0))
    state: dict = {}
    step = 0
    while step < max_steps:
        for batch in train[torch.randperm(len(train))].split(512):
            loss = F.cross_entropy(model(inputs[batch]), answers[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if variant != "baseline":
                filter_gradients(model, variant, state)
            optimizer.step()
            warmup.step()
            step += 1
            if step % eval_interval == 0:
                with torch.no_grad():
                    accuracy = (model(inputs[val]).argmax(-1) == answers[val]).float().mean().item()
                if accuracy >= target:
                    return step
            if step >= max_steps:
                break
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=list(SETTINGS), required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=6000)
    parser.add_argument("--eval-interval", type=int, default=10)
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--operation", choices=["mul", "div"], default="mul")
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps = run(args.variant, args.seed, args.max_steps, args.eval_interval, args.target, args.operation)
    print(json.dumps({"variant": args.variant, "seed": args.seed, "steps": steps}), flush=True)


if __name__ == "__main__":
    main()
