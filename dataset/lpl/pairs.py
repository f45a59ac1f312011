"""Pairs of temporally adjacent frames, the input of LPL and BYOL: batches {"x1", "x2", "label"}.

`x1` is the frame at t - dt, `x2` the frame at t: two views of the same image made by weak
augmentations (integer shifts, horizontal flips, brightness), float32 in [0, 1]. Images are kept as
uint8 and each batch is augmented when it is drawn:

* training batches draw fresh augmentation parameters from torch's global RNG, which the launcher
  checkpoints per rank, so a resumed run sees the same pairs;
* validation (and export) pairs use parameters drawn once from `seed`, so every evaluation and both
  activation exports (before / after training) see the very same pairs.

The augmentation is written here, batched with per-sample parameters, rather than with
torchvision's random transforms, which draw one parameter set per call and from their own RNG calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from dataset.tensors import collate_tensor_dicts


@dataclass(frozen=True)
class WeakAugmentation:
    """Shifts of up to `max_shift` pixels (zero padding), flips with probability `flip_prob`, brightness x [1-b, 1+b]."""

    max_shift: int = 2
    flip_prob: float = 0.0
    brightness: float = 0.0

    def sample(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(count, 4) parameters per view: shift_y, shift_x, flip (0/1), brightness factor."""
        shifts = torch.randint(-self.max_shift, self.max_shift + 1, (count, 2), generator=generator).float()
        flips = (torch.rand(count, 1, generator=generator) < self.flip_prob).float()
        factors = 1.0 + self.brightness * (2 * torch.rand(count, 1, generator=generator) - 1)
        return torch.cat([shifts, flips, factors], dim=1)

    def apply(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Augment float images (B, C, H, W) in [0, 1] with per-sample `params` (B, 4)."""
        pad = self.max_shift
        out = images
        if pad > 0:
            batch, _, height, width = images.shape
            padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
            windows = padded.unfold(2, height, 1).unfold(3, width, 1)  # (B, C, 2p+1, 2p+1, H, W), a view
            shifts = params[:, :2].long()
            out = windows[torch.arange(batch), :, pad - shifts[:, 0], pad - shifts[:, 1]]  # each sample's window
        flip = params[:, 2].bool()
        if bool(flip.any()):
            out = torch.where(flip[:, None, None, None], out.flip(-1), out)
        if self.brightness > 0:
            out = (out * params[:, 3, None, None, None]).clamp(0.0, 1.0)
        return out.contiguous()


class AugmentedPairs(Dataset):
    """Two weak augmentations of each uint8 image (N, C, H, W); `fixed_seed` fixes them (validation)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augmentation: WeakAugmentation,
                 fixed_seed: int | None = None) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {list(images.shape)}")
        self.images, self.labels, self.augmentation = images, labels.long(), augmentation
        self.fixed_params: torch.Tensor | None = None
        if fixed_seed is not None:
            generator = torch.Generator().manual_seed(fixed_seed)
            self.fixed_params = torch.stack([augmentation.sample(len(images), generator) for _ in range(2)], dim=1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        batch = self.__getitems__([index])
        return {k: v[0] for k, v in batch.items()}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        base = self.images[idx].float() / 255.0
        if self.fixed_params is not None:
            first, second = self.fixed_params[idx, 0], self.fixed_params[idx, 1]
        else:
            first, second = self.augmentation.sample(len(idx)), self.augmentation.sample(len(idx))
        return {
            "x1": self.augmentation.apply(base, first),
            "x2": self.augmentation.apply(base, second),
            "label": self.labels[idx],
        }


class PairData:
    """The data-module side shared by the pair datasets: collate, no-op prepare, model facts.

    Subclasses set `name` (used in export file names), `image_shape` (C, H, W), and fill
    `train_dataset` / `val_dataset` in `setup()`.
    """

    name = "pairs"
    image_shape: tuple[int, int, int] = (1, 32, 32)
    collate_fn = staticmethod(collate_tensor_dicts)

    def prepare_data(self, rebuild: bool = False, incremental: bool = True) -> None:
        """Nothing to build on disk (subclasses that read files check them here)."""

    def model_kwargs(self) -> dict[str, Any]:
        channels, height, width = self.image_shape
        return {"input_dim": channels * height * width, "in_channels": channels}


def split_indices(count: int, num_val: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded shuffle of range(count) cut into (train, val) with `num_val` validation indices."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[num_val:], order[:num_val]
