"""Samplers and loaders whose order is a pure function of (seed, epoch, position).

That makes resume exact: a checkpoint stores (epoch, batches done in the epoch) and the resumed run
skips exactly those batches. Training uses torch's DistributedSampler (one shard per rank, reshuffled
per epoch from seed + epoch), which is also what a single process uses (one replica).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way through (after `skip` samples).

    The global batch does not depend on the number of processes. Every rank shuffles the same
    permutation `perm` (seed + epoch) and takes the strided shard perm[rank::R] (drop_last: the tail
    that does not divide evenly is dropped), and the loader cuts it into per-rank batches of B = G / R
    (G = trainer.global_batch_size). So rank r's k-th batch is perm[k*G + r : (k+1)*G : R], and the
    union over ranks of the k-th batches is perm[k*G : (k+1)*G] for any R dividing G: the same examples
    a single process draws at step k (tests/test_distributed.py checks this and the loss curves).
    Each epoch has floor(len / G) steps whatever R is. A resume skips `batches_in_epoch * B` samples of
    each shard, i.e. the first `batches_in_epoch` global batches, which also holds when R changes.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, drop_last: bool = True) -> None:
        # drop_last=False keeps the last, shorter global batch of an epoch (torch pads a shard that would
        # come out shorter than the others by repeating the first indices, so every rank has as many batches).
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=drop_last)
        self._skip = 0

    def start_epoch(self, epoch: int, skip_samples: int = 0) -> None:
        self.set_epoch(epoch)
        self._skip = skip_samples

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self._skip :])

    def __len__(self) -> int:
        return max(0, self.num_samples - self._skip)


class ShardSampler(Sampler[int]):
    """Evaluation order: rank r takes every world_size-th index, no padding, so sums over ranks are exact.

    The order is one fixed shuffle (seed 0), so `trainer.eval_max_batches` sees a representative subset
    rather than the first rows of a file that may be sorted.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()  # type: ignore[arg-type]
        self.indices = order[rank::num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loader(
    dataset: Dataset,
    sampler: Sampler,
    batch_size: int,
    collate_fn: Callable | None,
    num_workers: int,
    drop_last: bool,
    pin_memory: bool,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        # Its own generator: otherwise every new iterator (resume mid-epoch, each evaluation) draws a seed
        # from the global RNG and shifts the dropout masks, breaking bitwise-exact resume.
        generator=torch.Generator(),
        persistent_workers=False,  # the sampler's start offset changes per epoch; fresh iterators pick it up
    )
