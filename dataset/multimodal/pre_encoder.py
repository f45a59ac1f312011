"""A frozen, trained image encoder that turns rendered images into stored features (pre-encoding).

With ``data.pre_encode`` set, the vision-unified builder stores what this encoder makes of each image,
float16 capsules [N, num_capsules, D], instead of the uint8 images: training then skips the encoder.
The module maps float images [B, 1, H, W] in [0, 1] to [B, num_capsules, D]; it is built by
``factory(**kwargs)`` (a callable or a dotted import path) and loaded from ``checkpoint``
(``torch.load`` with ``weights_only=True``; a plain state dict, or a trainer checkpoint whose
``"model"`` entry is used; ``state_prefix`` selects and strips a submodule's keys, e.g. ``"encoder."``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from dataset.errors import short_reason
from dataset.reasoning.arc import file_sha256
from dataset.streaming.manifest import StreamingDatasetError
from utils.config.errors import ConfigError


def import_callable(dotted: str) -> Callable[..., Any]:
    """The object at a dotted path such as ``models.multimodal.capsule_encoder.CapsuleEncoder``."""
    module_name, _, attr = dotted.rpartition(".")
    if not module_name:
        raise ConfigError(
            f"data.pre_encode.encoder_factory must be a dotted path like 'models.multimodal.capsule_encoder.CapsuleEncoder', got {dotted!r}"
        )
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"data.pre_encode.encoder_factory {dotted!r} cannot be imported: {short_reason(e)}") from e


class FrozenEncoder:
    """Loads the encoder on first use and applies it in batches, on ``device``, without gradients."""

    def __init__(
        self,
        factory: str | Callable[..., torch.nn.Module],
        checkpoint: Path,
        kwargs: Mapping[str, Any] | None = None,
        state_prefix: str = "",
        batch_size: int = 256,
        device: str = "cpu",
    ) -> None:
        self.factory = factory
        self.checkpoint = checkpoint
        self.kwargs = dict(kwargs or {})
        self.state_prefix = str(state_prefix or "")
        self.batch_size = batch_size
        self.device = str(device)
        self._module: torch.nn.Module | None = None
        self._checkpoint_sha: str | None = None

    def factory_name(self) -> str:
        """The factory as a dotted path (for the dataset's parameters)."""
        if isinstance(self.factory, str):
            return self.factory
        return f"{getattr(self.factory, '__module__', '?')}.{getattr(self.factory, '__qualname__', repr(self.factory))}"

    def checkpoint_sha256(self) -> str:
        """The weights' sha256 (computed once): other weights make another dataset."""
        if self._checkpoint_sha is None:
            self._checkpoint_sha = file_sha256(self.checkpoint)
        return self._checkpoint_sha

    def load(self) -> torch.nn.Module:
        factory = import_callable(self.factory) if isinstance(self.factory, str) else self.factory
        module = factory(**self.kwargs)
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"encoder_factory returned {type(module).__name__}, not a torch.nn.Module")
        path = self.checkpoint
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # any failure means the checkpoint is unusable
            raise StreamingDatasetError(
                f"encoder checkpoint {path} could not be loaded ({short_reason(e)}); "
                "point data.pre_encode.encoder_checkpoint at a trainer checkpoint or a state dict"
            ) from e
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]  # a trainer checkpoint (latest.pt / best.pt)
        if not isinstance(state, dict):
            raise StreamingDatasetError(f"encoder checkpoint {path} holds {type(state).__name__}, not a state dict")
        if self.state_prefix:
            prefix = self.state_prefix
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if not state:
                raise StreamingDatasetError(f"encoder checkpoint {path} has no keys starting with {prefix!r}")
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise StreamingDatasetError(
                f"encoder checkpoint {path} does not fit the encoder ({short_reason(e, limit=300)}); "
                "check data.pre_encode.encoder_kwargs / encoder_state_prefix"
            ) from e
        module.eval().requires_grad_(False)
        return module.to(self.device)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [N, 1, H, W] -> float16 capsules [N, num_capsules, D] on the CPU."""
        if self._module is None:
            self._module = self.load()
        outs = []
        for start in range(0, len(images), self.batch_size):
            x = images[start : start + self.batch_size].to(self.device, torch.float32) / 255.0
            y = self._module(x)
            if not isinstance(y, torch.Tensor) or y.dim() != 3 or y.shape[0] != x.shape[0]:
                got = list(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise StreamingDatasetError(f"the encoder must map [B, 1, H, W] to [B, num_capsules, D], got {got}")
            outs.append(y.to("cpu", torch.float16))
        return torch.cat(outs)
