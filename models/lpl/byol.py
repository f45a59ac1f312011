"""BYOL (Grill et al. 2020) as the baseline of the LPL family, with only the first conv layer learning.

Online and target networks have the same architecture: three 3x3 conv layers (64, 128, 256 channels,
stride 2, ReLU), global average pooling to a 256-d feature, and a projection head 256 -> 512 -> 128;
the online network also has a prediction head 128 -> 512 -> 128 (the heads are Linear-BatchNorm-ReLU-
Linear, as in BYOL). The loss (losses/byol.py) is the negative cosine similarity between the online
prediction of one view and the target projection of the other, symmetrised over the two views.

The local-learning constraint of the seed: only `online_encoder.conv1` is trained (every other
parameter has requires_grad=False). The target network gets no gradient: it is an exponential moving
average of the online network (tau = 0.99), updated after every optimizer step by the `lpl/byol_target_ema`
callback (models/lpl/callbacks.py) through `target_pairs()`.

Written here rather than taken from lightly: lightly's BYOL heads and loss are a few lines each, and
installing lightly pulls in PyTorch Lightning, torchmetrics and aiohttp, a stack this launcher does not use.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from models.lpl.inputs import validate_unit_interval


class ConvEncoder(nn.Module):
    """3 conv layers (64, 128, 256 channels, stride 2) and global average pooling: images -> 256-d features."""

    def __init__(self, in_channels: int, channels: tuple[int, int, int] = (64, 128, 256)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(channels[0], channels[1], 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(channels[1], channels[2], 3, stride=2, padding=1)
        self.feature_dim = channels[2]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(images))
        h = torch.relu(self.conv2(h))
        h = torch.relu(self.conv3(h))
        return h.mean(dim=(2, 3))


def mlp_head(input_dim: int, hidden_dim: int, output_dim: int) -> nn.Sequential:
    """BYOL's projection / prediction head: Linear - BatchNorm - ReLU - Linear."""
    return nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, output_dim))


class BYOLNetwork(nn.Module):
    """Online (encoder, projector, predictor) and target (encoder, projector) networks.

    `trainable`: the parameter-name prefixes that learn; the seed's constraint is the first conv layer only.
    """

    def __init__(self, in_channels: int, hidden_dim: int = 512, projection_dim: int = 128,
                 trainable: tuple[str, ...] = ("online_encoder.conv1",)) -> None:
        super().__init__()
        self.online_encoder = ConvEncoder(in_channels)
        feature_dim = self.online_encoder.feature_dim
        self.online_projector = mlp_head(feature_dim, hidden_dim, projection_dim)
        self.predictor = mlp_head(projection_dim, hidden_dim, projection_dim)
        self.target_encoder = copy.deepcopy(self.online_encoder)
        self.target_projector = copy.deepcopy(self.online_projector)
        learning = [name for name, _ in self.named_parameters() if name.startswith(tuple(trainable))]
        if not learning:
            raise ValueError(f"trainable={list(trainable)} matches no parameter of BYOLNetwork")
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(name.startswith(tuple(trainable)) and not name.startswith("target_"))

    def target_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(target, online) module pairs that the EMA callback averages."""
        return [(self.target_encoder, self.online_encoder), (self.target_projector, self.online_projector)]

    def forward(self, batch: dict[str, torch.Tensor], carry: Any = None) -> dict[str, Any]:
        views = [validate_unit_interval(batch["x1"], "x1"), validate_unit_interval(batch["x2"], "x2")]
        both = torch.cat(views)  # one pass over both views: BatchNorm sees the batch of 2B
        features = self.online_encoder(both)
        predictions = self.predictor(self.online_projector(features)).chunk(2)
        with torch.no_grad():  # the target is an average of the online weights, never trained
            targets = self.target_projector(self.target_encoder(both)).chunk(2)
        feature_std = torch.nn.functional.normalize(features.detach(), dim=1).std(dim=0).mean()
        return {
            "prediction_1": predictions[0], "prediction_2": predictions[1],
            "target_1": targets[0], "target_2": targets[1],
            "metrics": {"embedding_std": feature_std},
        }

    @torch.no_grad()
    def representations(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The exported embeddings: the online encoder's 256-d features, L2-normalised."""
        features = self.online_encoder(validate_unit_interval(images, "images"))
        return {"embeddings": torch.nn.functional.normalize(features, dim=1)}
