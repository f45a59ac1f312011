"""Input checks shared by the LPL and BYOL models: images are float32 in [0, 1] (the seed's validation)."""

from __future__ import annotations

import torch

from utils.config.errors import ConfigError


def validate_unit_interval(images: torch.Tensor, key: str) -> torch.Tensor:
    """`images` if it is float32 with every value in [0, 1]; a ConfigError naming batch[key] otherwise."""
    if images.dtype != torch.float32:
        raise ConfigError(
            f"batch[{key!r}] is {str(images.dtype).removeprefix('torch.')}; the LPL and BYOL models take float32 "
            "images in [0, 1] (convert uint8 pixels with x.float() / 255)."
        )
    low, high = torch.aminmax(images)
    if not (bool(low >= 0.0) and bool(high <= 1.0)):  # also False for NaN
        raise ConfigError(
            f"batch[{key!r}] holds values in [{float(low):.4g}, {float(high):.4g}]; the LPL and BYOL models take images "
            "in [0, 1] (divide 8-bit pixels by 255, and do not normalise by a mean and std)."
        )
    return images


def flatten_images(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) or (B, D) -> (B, C*H*W)."""
    return images.reshape(images.shape[0], -1)
