"""QwT* runs on a tiny RepQ-ViT W4/A4 + QwT model, for the checkpoint/resume and multi-process tests
(test_finetune_runs.py): in the test's process (``run_job``) or as a process of a gloo group.

    python finetune_driver.py JOBS_JSON RANK WORLD PORT

Each job: ``out`` (a torch file: trainable parameters, result, eval logits; or ``error``, the UserError line;
rank r > 0 writes ``out.rank<r>``), ``checkpoint``, ``batch``, ``epochs``, ``mixup``, ``kill_after`` (SIGKILL
this process when its data set is asked for item number kill_after + 1: between two checkpoints) and
``nan_after`` (the images of rank ``nan_rank``, default 0, turn NaN after that many items)."""
import copy
import json
import os
import random
import signal
import sys

import numpy as np
import torch
from torch.utils.data import Dataset

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

IMAGES, CHECKPOINT_EVERY, LR = 48, 4, 1e-3


class NoisyImages(Dataset):
    """Fixed random images with a random transform drawing from torch, python and numpy generators."""

    def __init__(self, kill_after=None, nan_after=None):
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(IMAGES, 3, 32, 32, generator=g)
        self.y = torch.randint(0, 10, (IMAGES,), generator=g)
        self.kill_after, self.nan_after, self.served = kill_after, nan_after, 0

    def __len__(self):
        return IMAGES

    def __getitem__(self, i):
        self.served += 1
        if self.kill_after is not None and self.served > self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        x = self.x[i] + 0.1 * torch.randn(3, 32, 32)
        if random.random() < 0.5:
            x = x.flip(-1)
        x = x * float(np.random.uniform(0.9, 1.1))
        if self.nan_after is not None and self.served > self.nan_after:
            x = x * float('nan')
        return x, self.y[i]


def quantized_model():
    """(RepQ-ViT W4/A4 + QwT tiny ViT with blocks 0 and 1 left at zero compensation, its FP model, eval images)."""
    import quant
    from conftest import make_tiny_vit
    from quant.qwt import qwt_compensate
    model = make_tiny_vit(seed=0)
    fp = copy.deepcopy(model)
    g = torch.Generator().manual_seed(123)
    images = torch.randn(16, 3, 32, 32, generator=g)
    quant.repq_vit(model, images[:8], 4, 4)
    qwt_compensate(model, images, start_block=2, batch_size=8)
    return model, fp, torch.randn(4, 3, 32, 32, generator=g)


def run_job(job, rank=0):
    from quant.finetune import FinetuneConfig, finetune, trainable_parameters
    from utils.core.errors import UserError
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    model, fp, eval_images = quantized_model()
    config = FinetuneConfig(epochs=job.get('epochs', 2), batch_size=job['batch'], lr=LR, mixup=job.get('mixup', 0.0),
                            checkpoint_every=CHECKPOINT_EVERY, workers=0, seed=0)
    data = NoisyImages(job.get('kill_after'), job.get('nan_after') if rank == job.get('nan_rank', 0) else None)
    out = job['out'] if rank == 0 else f"{job['out']}.rank{rank}"
    try:
        result = finetune(model, data, config, job['checkpoint'], 'cpu', teacher=fp, progress=False)
    except UserError as exc:
        torch.save({'error': str(exc)}, out)
        return
    with torch.no_grad():
        logits = model(eval_images)
    torch.save({'trainable': {k: v.detach().clone() for k, v in trainable_parameters(model).items()},
                'result': vars(result), 'logits': logits}, out)


def main(jobs, rank, world, port):
    torch.set_num_threads(1)
    if world == 1:
        for job in jobs:
            run_job(job)
        return
    from conftest import gloo_group
    with gloo_group(rank, world, port):
        for job in jobs:
            run_job(job, rank)


if __name__ == '__main__':
    main(json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
