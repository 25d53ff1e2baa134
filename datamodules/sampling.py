"""Which images each process sees, and with which random augmentation, at every epoch.

Two properties the suite relies on:
- **The same global batches whatever the number of processes.** The training order of an epoch is
  one permutation drawn from (seed, epoch); global batch b is the b-th chunk of world_size x
  batch_size images, and rank r takes the r-th slice of it. One process with batch 4 and two
  processes with batch 2 therefore see the same images in the same global batches (with
  SyncBatchNorm, the same batch statistics too): PROTOCOL.md §6's effective batch is a real
  equivalence, and the DDP test checks it.
- **Augmentation is a function of (seed, epoch, image), not of a process's random state.** The
  sampler yields (epoch, index) pairs and the dataset seeds the augmentation of that image with
  them. So the crops do not depend on the number of loader workers or processes, and a run
  resumed from an epoch-end checkpoint continues exactly as the uninterrupted run would have.

Evaluation is sharded without padding (torch's DistributedSampler repeats images to even out the
ranks, which would count them twice in the summed confusion matrix). So is a method's pass over the
training images before training (`ShardedSampler` with an epoch tag: the train transform, seeded).

A step may train on several sources (RECALL: the step's images and a replay pool):
`InterleavedTrainingSampler` draws global batch b from source b mod k, so batches alternate between
the sources, again the same global batches for any number of processes.
"""
from __future__ import annotations

import random

import numpy as np
from torch.utils.data import Sampler


def epoch_permutation(num_items: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of `epoch`: a permutation of range(num_items) drawn from (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_items)


class EpochTrainingSampler(Sampler):
    """This rank's share of each epoch's global batches, as (epoch, index) pairs.

    The epoch's permutation is cut into global batches of world_size x batch_size images; rank r
    takes positions [r*B, (r+1)*B) of each. Only whole optimizer updates are kept (as drop_last
    does): with gradient accumulation over A batches, the epoch ends at a multiple of A, so one
    process accumulating 2 batches of B and two processes with one batch of B each make the same
    updates from the same images. Lightning calls set_epoch at the start of every epoch.

    passes > 1: an epoch is that many passes over the items, pass p of epoch e permuted (and
    augmented) as pass number e * passes + p, as PIFS's loop repeats its loader 20 // nshot times
    per epoch with `set_epoch(epoch * n_iter + iteration)`."""

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, accumulation: int = 1, passes: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if passes < 1:
            raise ValueError(f"an epoch needs at least one pass, not {passes}")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size, self.shuffle, self.accumulation = rank, world_size, shuffle, accumulation
        self.passes = passes
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_batches(self) -> int:
        updates = self.num_items // (self.batch_size * self.world_size * self.accumulation)
        return updates * self.accumulation * self.passes

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def __iter__(self):
        global_batch = self.batch_size * self.world_size
        per_pass = self.num_batches // self.passes
        for p in range(self.passes):
            pass_number = self.epoch * self.passes + p if self.passes > 1 else self.epoch
            order = epoch_permutation(self.num_items, self.seed, pass_number) if self.shuffle else np.arange(self.num_items)
            for b in range(per_pass):
                start = b * global_batch + self.rank * self.batch_size
                for index in order[start: start + self.batch_size]:
                    yield pass_number, int(index)


class InterleavedTrainingSampler(EpochTrainingSampler):
    """Several training sources (one ConcatDataset, source k at offset sum(sizes[:k])): global
    batch b comes from source b mod k, from that source's own permutation of (seed, epoch, k),
    continued across its global batches and wrapped when a later source is shorter. An epoch
    ends when source 0 (the step's own images) has no whole global batch left, so it has k times
    the global batches of source 0 alone; only whole optimizer updates are kept."""

    def __init__(self, sizes: list[int], batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 accumulation: int = 1):
        if not sizes or min(sizes) < 1:
            raise ValueError(f"every training source needs images; sizes {sizes}")
        super().__init__(sum(sizes), batch_size, seed, rank, world_size, accumulation=accumulation)
        self.sizes = list(sizes)

    @property
    def num_batches(self) -> int:
        per_source = self.sizes[0] // (self.batch_size * self.world_size)
        return (per_source * len(self.sizes)) // self.accumulation * self.accumulation

    def __iter__(self):
        offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        orders = [np.random.default_rng([self.seed, self.epoch, k]).permutation(n) for k, n in enumerate(self.sizes)]
        global_batch = self.batch_size * self.world_size
        for b in range(self.num_batches):
            k, chunk = b % len(self.sizes), b // len(self.sizes)
            start = chunk * global_batch + self.rank * self.batch_size
            for position in range(start, start + self.batch_size):
                yield self.epoch, int(offsets[k] + orders[k][position % self.sizes[k]])


class ShardedSampler(Sampler):
    """Rank r takes positions r, r + W, r + 2W, ... of the set: every image exactly once over all
    ranks (shards differ by at most one image; no padding). With `epoch`, it yields (epoch, index)
    pairs, so the dataset seeds its (training) augmentation as for that epoch."""

    def __init__(self, num_items: int, rank: int = 0, world_size: int = 1, epoch: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.num_items, self.rank, self.world_size, self.epoch = num_items, rank, world_size, epoch

    def __len__(self) -> int:
        return len(range(self.rank, self.num_items, self.world_size))

    def __iter__(self):
        positions = range(self.rank, self.num_items, self.world_size)
        return iter(positions) if self.epoch is None else ((self.epoch, i) for i in positions)


# The "epoch" of a method's pass over the training images before training: it seeds that pass's
# augmentation apart from every training epoch (no schedule reaches it).
TRAINING_PASS_EPOCH = 1_000_000


def seed_augmentation(transform, seed: int, epoch: int, index: int) -> None:
    """Seed an albumentations pipeline for one image of one epoch (see the module docstring)."""
    sequence = np.random.SeedSequence([seed, epoch, index])
    transform.set_random_state(np.random.default_rng(sequence), random.Random(int(sequence.generate_state(1)[0])))
