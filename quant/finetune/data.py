"""Which images each QwT* step sees, and their augmentation, independent of processes, workers and resumes.

Every epoch is timm-style ``DistributedSampler(shuffle=True, seed, drop_last=True)`` with ``set_epoch``: rank r
takes positions r, r + N, r + 2N ... of one global permutation, so N processes x batch B see at step s the
images that one process x batch N*B sees. Each image is transformed under its own seed, drawn from (seed,
epoch, global position): the augmented pixels then depend neither on the worker that loads the image nor on
where a run was resumed, and the process's own generators are left as they were."""
import random
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from utils.core.errors import UserError


def steps_per_epoch(dataset_len, max_images, batch_size, world):
    """Optimizer steps in one epoch: whole global batches (batch x processes) of the epoch's images (all of the
    dataset, or ``max_images``)."""
    images = dataset_len if max_images is None else min(dataset_len, max_images)
    steps = images // (batch_size * world)
    if steps < 1:
        raise UserError(f"QwT* needs at least one batch of {batch_size} x {world} process(es) = {batch_size * world} "
                        f"training images per epoch, and has {images}: lower --finetune_batch_size or give more images")
    return steps


_MASK64 = (1 << 64) - 1


def sample_seed(seed, epoch, position):
    """The augmentation seed (32 bits) of the image at global ``position`` of ``epoch``'s order: splitmix64's
    finaliser of the three numbers combined (a few integer operations: an ImageNet epoch has 1.28 M of them)."""
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xD1B54A32D192ED03 + position * 0x8CB92BA72F3D8DD7 + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 32


def epoch_items(dataset_len, seed, epoch, rank, world, steps, batch_size, start_step=0):
    """This rank's (dataset index, augmentation seed) for steps ``start_step`` .. ``steps`` - 1 of ``epoch``."""
    sampler = DistributedSampler(range(dataset_len), num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    sampler.set_epoch(epoch)
    indices = list(sampler)
    return [(indices[k], sample_seed(seed, epoch, k * world + rank))
            for k in range(start_step * batch_size, steps * batch_size)]


@contextmanager
def private_random_state(seed):
    """python, numpy and torch (CPU) generators seeded with ``seed`` inside, restored after."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)  # the CPU's: torch.manual_seed would queue CUDA seeding too
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class SeededSamples(Dataset):
    """``dataset[index]`` computed under the item's own seed; items are (index, seed) pairs."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        with private_random_state(seed):
            return self.dataset[index]


def epoch_loader(dataset, items, batch_size, workers, pin_memory):
    """Batches of ``items`` in order; the loader's own base-seed draw comes from a private generator, so the
    process's torch generator is not consumed."""
    return DataLoader(SeededSamples(dataset), batch_size=batch_size, sampler=items, num_workers=workers,
                      pin_memory=pin_memory, drop_last=False, persistent_workers=False,
                      generator=torch.Generator().manual_seed(0))
