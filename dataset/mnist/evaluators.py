"""Validation metrics of image reconstructions (pixels in [0, 1]), summed so ranks add up exactly."""

from __future__ import annotations

import torch

from utils.evaluators import SumEvaluator


class ReconstructionQuality(SumEvaluator):
    """`psnr_db`: the mean over validation images of 10 log10(1 / per-image MSE) (peak value 1), the figure
    image papers quote. (The MSE per pixel itself is the loss term's `val/reconstruction`.)"""

    sum_names = ("psnr_db", "images")

    def __init__(self, output_key: str = "reconstruction", target_key: str = "x", max_psnr_db: float = 60.0) -> None:
        super().__init__()
        self.output_key, self.target_key = output_key, target_key
        self.max_psnr_db = max_psnr_db  # a perfect image would have an infinite PSNR: cap it

    def update(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
        prediction, target = outputs[self.output_key].float(), batch[self.target_key].float()
        per_image_mse = ((prediction - target) ** 2).reshape(len(target), -1).mean(dim=1)
        psnr = -10.0 * torch.log10(per_image_mse.clamp_min(10 ** (-self.max_psnr_db / 10)))
        self.add("psnr_db", psnr.sum())
        self.add("images", len(target))

    def compute(self) -> dict[str, float]:
        return {"psnr_db": self._ratio("psnr_db", "images")}  # NaN when nothing was evaluated
