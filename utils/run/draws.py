"""SPEC §1b: the published run's draws from the global generators, step by step: the seeds, the calibration
batch, the float model, the QwT images; and --dump_inputs' file of them. (The draws replayed between these
steps, the wrapping's and the evaluation loaders', stay in utils.run.pipeline, which decides on them.)"""
import logging
import random

import numpy as np
import torch

from models import build_model, pretrained_cached, randomize_batchnorms, randomize_layernorms
from utils.core import distributed
from utils.core.files import rank_path, write_atomic
from utils.core.progress import progress_bar
from utils.run.data import train_loader

_logger = logging.getLogger('qwt')


def seed_everything(seed):
    """SPEC §1b step 1, on every process alike."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed(seed)
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.deterministic = True


def calibration_batch(run, train):
    """Step 2: the first batch of the shuffled training loader, rank 0's on every process.
    Returns (images on the device, their files relative to DATA_DIR)."""
    loader = train_loader(train, run.args.batch_size, run.args.num_workers, run.dist)
    batch = next(iter(loader))
    files = distributed.broadcast_object(run.images.files(train, batch))
    images = distributed.broadcast(batch[0].to(run.dist.device))
    # The published script's own check line: compare it with a published log.
    _logger.info('calib_data[0, 0, 0, :5] = %s', ', '.join(f'{v:.4f}' for v in images[0, 0, 0, :5].tolist()))
    return images, files


def build_float_model(run):
    """Step 3: timm's model (its initialisation draws), and where its weights came from ('checkpoint',
    'pretrained', 'random')."""
    args, spec = run.args, run.spec
    if run.checkpoint is not None:
        weights = 'checkpoint'
    elif args.demo and (run.family == 'resnet' or not pretrained_cached(spec.timm_name)):
        weights = 'random'  # --demo never downloads
    else:
        weights = 'pretrained'
    model = build_model(spec.timm_name, pretrained=weights == 'pretrained', checkpoint=run.checkpoint,
                        trust_checkpoint=args.trust_checkpoint)
    if weights == 'random':
        (randomize_batchnorms if run.family == 'resnet' else randomize_layernorms)(model, args.seed)
    _logger.info('%s weights', weights)
    return model.to(run.dist.device), weights


def calibration_and_model(run, splits):
    """Steps 2-3: the calibration batch (before any model), then the float model."""
    with run.timer('calibration_data'):
        calib, calib_files = calibration_batch(run, splits.train)
    with run.timer('build'):
        model, weights = build_float_model(run)
    return calib, calib_files, model, weights


def qwt_batches(run, train):
    """Step 7: this process's QwT images, the first qwt_samples / (batch x processes) batches of a new
    pass over the training loader, and the files of every process's images in rank order."""
    args = run.args
    n_batches = args.qwt_samples // args.batch_size // run.dist.world_size
    loader = train_loader(train, args.batch_size, args.num_workers, run.dist)
    batches, files = [], []
    for batch in progress(loader, run, 'QwT images', total=n_batches):
        batches.append(batch[0].to(run.dist.device, non_blocking=True))
        files += run.images.files(train, batch)
        if len(batches) == n_batches:
            break
    return torch.cat(batches), [f for part in distributed.all_gather_object(files) for f in part]


def progress(iterable, run, desc, total=None):
    return progress_bar(iterable, desc=desc, total=total, unit='batch', enabled=run.dist.is_main)


def dump_inputs(run, calib, calib_files, images, qwt_files):
    """--dump_inputs: the calibration batch and this process's QwT images, for comparison with the
    published run (rank r > 0 writes PATH.rank<r>)."""
    path = rank_path(run.args.dump_inputs, run.dist.rank)
    rank_files = qwt_files[run.dist.rank * len(images):(run.dist.rank + 1) * len(images)]
    payload = {'calib': calib.float().cpu(), 'qwt': images.float().cpu(), 'calib_files': calib_files,
               'qwt_files': rank_files}
    write_atomic(path, lambda tmp: torch.save(payload, tmp))
    _logger.info('wrote the calibration batch %s and %d QwT images to %s', tuple(calib.shape), len(images), path)
