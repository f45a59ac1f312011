"""Synthetic 32x32 grayscale shapes in clutter, as pairs of frames of a moving object; deterministic from `seed`.

Eight classes (disk, square, triangle, plus, ring, bar, L, frame). Each object has a random position,
scale, rotation and brightness; between the two frames of a pair it moves (shift, rotation, scale
change), and the clutter (random strokes) and pixel noise are drawn anew for each frame. So the object's
identity is the only thing the two frames share, and it is hard for raw pixels: a linear read-out of
the pixels sees shapes anywhere, at any angle and size, behind strokes that look like parts of shapes.

Everything is rendered once, in `setup()`, with a generator seeded by `seed` (a few seconds for the
default 20,000 pairs), from signed distance functions; frames are stored as uint8.
"""

from __future__ import annotations

import math

import torch

from dataset.lpl.pairs import PairData
from dataset.tensors import TensorDictDataset, collate_tensor_dicts
from utils.config.errors import ConfigError

CLASSES = ("disk", "square", "triangle", "plus", "ring", "bar", "L", "frame")


def _box(u: torch.Tensor, v: torch.Tensor, half_u: float, half_v: float) -> torch.Tensor:
    """Signed distance to an axis-aligned box centred at 0."""
    du, dv = u.abs() - half_u, v.abs() - half_v
    outside = torch.sqrt(du.clamp(min=0) ** 2 + dv.clamp(min=0) ** 2)
    return outside + torch.minimum(torch.maximum(du, dv), torch.zeros_like(du))


def _triangle(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Signed distance to an equilateral triangle with one vertex up (the classic closed form)."""
    k = math.sqrt(3.0)
    tu, tv = u.abs() - 0.9, v + 0.9 / k
    swap = tu + k * tv > 0
    tu, tv = torch.where(swap, (tu - k * tv) / 2, tu), torch.where(swap, (-k * tu - tv) / 2, tv)
    tu = tu - tu.clamp(-1.8, 0.0)
    return -torch.sqrt(tu**2 + tv**2) * torch.sign(tv)


# Signed distance functions in object units (each shape spans about [-1, 1]), in the order of CLASSES.
DISTANCES = (
    lambda u, v: torch.sqrt(u**2 + v**2) - 0.9,                                      # disk
    lambda u, v: _box(u, v, 0.8, 0.8),                                               # square
    _triangle,                                                                       # triangle
    lambda u, v: torch.minimum(_box(u, v, 0.95, 0.28), _box(u, v, 0.28, 0.95)),      # plus
    lambda u, v: (torch.sqrt(u**2 + v**2) - 0.7).abs() - 0.25,                       # ring
    lambda u, v: _box(u, v, 1.0, 0.25),                                              # bar
    lambda u, v: torch.minimum(_box(u + 0.35, v, 0.3, 0.95), _box(u, v - 0.65, 0.95, 0.3)),  # L
    lambda u, v: torch.maximum(_box(u, v, 0.85, 0.85), -_box(u, v, 0.5, 0.5)),       # frame (hollow square)
)


def shape_distance(kind: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Signed distance of each sample's shape `kind` (B,) at its points (u, v) (B, P); one class at a time."""
    out = torch.empty_like(u)
    for index, distance in enumerate(DISTANCES):
        rows = (kind == index).nonzero().squeeze(1)
        if len(rows):
            out[rows] = distance(u[rows], v[rows])
    return out


def _segment_distance(px: torch.Tensor, py: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """Distance of points (P,) to segments seg (B, K, 4) = (x0, y0, x1, y1): (B, K, P)."""
    x0, y0, x1, y1 = (seg[..., i, None] for i in range(4))
    dx, dy = x1 - x0, y1 - y0
    t = (((px - x0) * dx + (py - y0) * dy) / (dx**2 + dy**2 + 1e-8)).clamp(0, 1)
    return torch.sqrt((px - x0 - t * dx) ** 2 + (py - y0 - t * dy) ** 2)


def render(kind: torch.Tensor, pose: torch.Tensor, strokes: torch.Tensor, noise: torch.Tensor, size: int) -> torch.Tensor:
    """Frames (B, 1, size, size) in [0, 1].

    pose (B, 5): centre x, y in [-1, 1], scale, angle, brightness; strokes (B, K, 5): segment ends and
    brightness; noise (B, size*size): additive pixel noise.
    """
    pixel = 2.0 / size
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) * pixel - 1.0
    py, px = torch.meshgrid(coords, coords, indexing="ij")
    px, py = px.reshape(-1), py.reshape(-1)
    cx, cy, scale, angle, brightness = (pose[:, i, None] for i in range(5))
    cos, sin = torch.cos(angle), torch.sin(angle)
    du, dv = px - cx, py - cy
    u, v = (cos * du + sin * dv) / scale, (-sin * du + cos * dv) / scale
    coverage = (0.5 - shape_distance(kind, u, v) * scale / pixel).clamp(0, 1)  # anti-aliased edge, one pixel wide
    image = coverage * brightness
    if strokes.shape[1] > 0:
        stroke_cover = (0.5 - (_segment_distance(px, py, strokes[..., :4]) - 0.05) / pixel).clamp(0, 1)
        image = torch.maximum(image, (stroke_cover * strokes[..., 4, None]).amax(dim=1))
    return (image + noise).clamp(0, 1).reshape(-1, 1, size, size)


def _to_float_pairs(batch: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """uint8 frames -> float32 in [0, 1] under the names the models read."""
    batch = collate_tensor_dicts(batch)
    return {"x1": batch["x1_u8"].float() / 255.0, "x2": batch["x2_u8"].float() / 255.0, "label": batch["label"]}


class ShapesData(PairData):
    """Pairs of frames of shapes in clutter; `num_train` / `num_val` pairs, labels are the class index."""

    name = "shapes"
    collate_fn = staticmethod(_to_float_pairs)

    def __init__(self, num_train: int = 20000, num_val: int = 2000, image_size: int = 32, num_strokes: int = 3,
                 noise_std: float = 0.05, max_move: float = 0.15, max_turn: float = 0.5, seed: int = 0) -> None:
        if num_train < 2 or num_val < 2:
            raise ConfigError(f"data.num_train and data.num_val must be at least 2, got {num_train} and {num_val}.")
        if image_size < 8:
            raise ConfigError(f"data.image_size must be at least 8 pixels, got {image_size}.")
        self.num_train, self.num_val, self.image_size = num_train, num_val, image_size
        self.num_strokes, self.noise_std, self.max_move, self.max_turn, self.seed = (
            num_strokes, noise_std, max_move, max_turn, seed)
        self.image_shape = (1, image_size, image_size)
        self.num_classes = len(CLASSES)

    def setup(self) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        frames, labels = self.generate(self.num_train + self.num_val, generator)
        split = self.num_train
        self.train_dataset = TensorDictDataset({"x1_u8": frames[:split, 0], "x2_u8": frames[:split, 1],
                                                "label": labels[:split]})
        self.val_dataset = TensorDictDataset({"x1_u8": frames[split:, 0], "x2_u8": frames[split:, 1],
                                              "label": labels[split:]})

    def generate(self, count: int, generator: torch.Generator, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
        """(count, 2, 1, S, S) uint8 frames and (count,) labels, drawn from `generator`."""
        frames, labels = [], []
        for start in range(0, count, chunk):
            n = min(chunk, count - start)
            kind = torch.randint(0, len(CLASSES), (n,), generator=generator)
            first = torch.stack([
                (torch.rand(n, generator=generator) * 2 - 1) * 0.55,          # centre x
                (torch.rand(n, generator=generator) * 2 - 1) * 0.55,          # centre y
                0.22 + 0.2 * torch.rand(n, generator=generator),             # scale (radius, in image units)
                2 * math.pi * torch.rand(n, generator=generator),            # angle
                0.6 + 0.4 * torch.rand(n, generator=generator),              # brightness
            ], dim=1)
            motion = torch.stack([
                (torch.rand(n, generator=generator) * 2 - 1) * self.max_move,
                (torch.rand(n, generator=generator) * 2 - 1) * self.max_move,
                torch.exp((torch.rand(n, generator=generator) * 2 - 1) * 0.15),
                (torch.rand(n, generator=generator) * 2 - 1) * self.max_turn,
                torch.zeros(n),
            ], dim=1)
            second = first.clone()
            second[:, :2] = (first[:, :2] + motion[:, :2]).clamp(-0.7, 0.7)
            second[:, 2] = first[:, 2] * motion[:, 2]
            second[:, 3] = first[:, 3] + motion[:, 3]
            pair = []
            for pose in (first, second):
                strokes = self._strokes(n, generator)
                noise = torch.randn(n, self.image_size**2, generator=generator) * self.noise_std
                pair.append(render(kind, pose, strokes, noise, self.image_size))
            frames.append((torch.stack(pair, dim=1) * 255).round().to(torch.uint8))
            labels.append(kind)
        return torch.cat(frames), torch.cat(labels)

    def _strokes(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, K, 5): random segments of length 0.3-0.8 anywhere in the image, brightness 0.3-0.8."""
        k = self.num_strokes
        start = (torch.rand(n, k, 2, generator=generator) * 2 - 1) * 0.95
        length = 0.3 + 0.5 * torch.rand(n, k, 1, generator=generator)
        angle = 2 * math.pi * torch.rand(n, k, 1, generator=generator)
        end = start + length * torch.cat([torch.cos(angle), torch.sin(angle)], dim=-1)
        brightness = 0.3 + 0.5 * torch.rand(n, k, 1, generator=generator)
        return torch.cat([start, end, brightness], dim=-1)
