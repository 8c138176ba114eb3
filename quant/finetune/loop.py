"""The QwT* training loop: AdamW on the compensation and the head, cosine schedule stepped per optimizer step,
AMP with a grad scaler on CUDA, gradients averaged over the process group (DDP), checkpoint and resume."""
import logging
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from quant.finetune.config import FinetuneResult
from quant.finetune.data import epoch_items, epoch_loader, private_random_state, sample_seed, steps_per_epoch
from quant.finetune.params import finish_finetune, prepare_for_finetune
from quant.finetune.state import check_resumable, load_checkpoint, save_checkpoint
from utils.core import distributed
from utils.core.errors import UserError
from utils.core.progress import progress_bar

_logger = logging.getLogger(__name__)
CURVE_POINTS = 20  # about this many (step, loss) pairs in the result
LOG_EVERY_S = 60.0  # a progress line at every tenth of the run, and at least once a minute


def build_optimizer(trainable, config):
    """timm's AdamW over the trainable parameters only (weight decay, if any, spares 1-D ones: biases)."""
    from timm.optim import create_optimizer_v2
    holder = nn.Module()
    holder.params = nn.ParameterList(list(trainable.values()))
    return create_optimizer_v2(holder, 'adamw', learning_rate=config.lr, weight_decay=config.weight_decay)


def build_scheduler(optimizer, config, total_steps):
    """timm's cosine schedule over all steps, with a linear warm-up from min_lr; stepped per optimizer step."""
    from timm.scheduler import CosineLRScheduler
    return CosineLRScheduler(optimizer, t_initial=total_steps, lr_min=config.min_lr, warmup_t=config.warmup_steps,
                             warmup_lr_init=config.min_lr, t_in_epochs=False)


class Criterion:
    """Targets and loss of one batch. 'label': cross-entropy on the labels (timm's LabelSmoothingCrossEntropy
    with smoothing); 'distill': timm's SoftTargetCrossEntropy against the teacher's softmax on the same
    (mixed) images. Mixup/CutMix: timm's Mixup in batch mode with soft-target cross-entropy."""

    def __init__(self, config, num_classes, teacher):
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
        self.loss, self.teacher, self.num_classes, self.smoothing = config.loss, teacher, num_classes, config.smoothing
        self.mixup = None
        if config.mixup > 0 or config.cutmix > 0:
            from timm.data import Mixup  # only here: its element mode uses np.bool, gone in numpy 2
            self.mixup = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, label_smoothing=config.smoothing,
                               num_classes=num_classes, mode='batch')
        if config.loss == 'distill' or self.mixup is not None:
            self.fn = SoftTargetCrossEntropy()
        elif config.smoothing > 0:
            self.fn = LabelSmoothingCrossEntropy(config.smoothing)
        else:
            self.fn = nn.CrossEntropyLoss()

    def inputs_and_targets(self, images, labels, seed):
        """``seed``: the step's own seed for the mixup draws (numpy's generator, restored after), so that they
        depend on nothing that ran before."""
        targets = labels
        if self.mixup is not None:
            from timm.data.mixup import mixup_target
            # Mixup.__call__ of timm 0.4.12 builds its targets on 'cuda' whatever the device: mix the batch
            # in place with its own batch-mode draw, and build the soft targets where the images are
            with private_random_state(seed):
                lam = self.mixup._mix_batch(images)
            targets = mixup_target(labels, self.num_classes, lam, self.smoothing, device=images.device)
        if self.loss == 'distill':
            with torch.no_grad():
                targets = F.softmax(self.teacher(images).float(), dim=-1)
        return images, targets

    def __call__(self, logits, targets):
        return self.fn(logits.float(), targets)


def recipe_of(config, world, total_steps, per_epoch, amp_used):
    """The config plus what the run made of it (``amp_used``: float16 autocast and grad scaler, CUDA only)."""
    return dict(config.as_dict(), optimizer='timm create_optimizer_v2 adamw', scheduler='timm CosineLRScheduler, '
                'per optimizer step, linear warm-up from min_lr', processes=world, amp_used=amp_used,
                global_batch=config.batch_size * world, steps_per_epoch=per_epoch, total_steps=total_steps)


def _global_mean(value):
    """The mean of a 0-dim tensor over all processes, as a float: the same number on every rank."""
    t = value.detach().double().reshape(1).clone()
    distributed.all_reduce_sum(t)
    return float(t) / distributed.world_size()


def _ddp(model, device):
    """DDP without the per-forward buffer broadcast (the buffers are frozen; rank 0's are synced at start)."""
    import inspect
    ddp = nn.parallel.DistributedDataParallel
    no_sync = ({'forward_sync_buffers': False} if 'forward_sync_buffers' in inspect.signature(ddp).parameters
               else {'broadcast_buffers': False})  # torch >= 2.14 deprecates the second
    index = device.index if device.index is not None else torch.cuda.current_device() if device.type == 'cuda' else None
    return ddp(model, device_ids=None if index is None else [index], **no_sync)


def _restore(state, trainable, optimizer, scheduler, scaler):
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(state['trainable'][name])
    optimizer.load_state_dict(state['optimizer'])
    scheduler.load_state_dict(state['scheduler'])
    if scaler is not None and state['scaler'] is not None:
        scaler.load_state_dict(state['scaler'])


def _step_lr(optimizer):
    return max(g['lr'] for g in optimizer.param_groups)


def finetune(model, dataset, config, checkpoint_path, device, teacher=None, progress=True):
    """Fine-tune ``model``'s compensation and head(s) on ``dataset`` (image, label) per ``config`` (see
    FinetuneConfig), in place; resumes from ``checkpoint_path`` where it exists. Returns a FinetuneResult,
    the model back in eval mode. Inside a process group every process must call it with the same config."""
    config.validate()
    device = torch.device(device)
    world, rank = distributed.world_size(), distributed.rank()
    if config.epochs == 0:
        return FinetuneResult(0, 0, [], 0.0, None, recipe_of(config, world, 0, 0, False))
    if config.loss == 'distill' and teacher is None:
        raise UserError("--finetune_loss distill needs the full-precision model as teacher: pass it, or use "
                        "--finetune_loss label")
    per_epoch = steps_per_epoch(len(dataset), config.max_images, config.batch_size, world)
    total = per_epoch * config.epochs
    trainable = prepare_for_finetune(model)
    optimizer = build_optimizer(trainable, config)
    scheduler = build_scheduler(optimizer, config, total)
    use_amp = config.amp and device.type == 'cuda'
    scaler = None
    if use_amp:
        from timm.utils import NativeScaler
        scaler = NativeScaler()

    step, curve, seconds_before, resumed_from = 0, [], 0.0, None
    state = load_checkpoint(checkpoint_path)
    if state is not None:
        check_resumable(checkpoint_path, state, config.as_dict(), world, trainable)
        _restore(state, trainable, optimizer, scheduler, scaler)
        step, curve, seconds_before = state['step'], [list(p) for p in state['loss_curve']], state['seconds']
        resumed_from = step
        _logger.info('resuming QwT* from step %d of %d (%s)', step, total, checkpoint_path)

    forward = model
    if world > 1:  # DDP averages the gradients; it also starts every process from rank 0's parameters
        forward = _ddp(model, device)
    criterion = Criterion(config, model.num_classes, teacher)
    curve_every = max(1, total // CURVE_POINTS)
    log_every = max(1, total // 10)
    main = rank == 0
    bar = progress_bar(total=total - step, desc='QwT*', unit='step', enabled=progress and main)
    started = time.monotonic()
    window_start, window_images = started, 0

    def save(at):
        save_checkpoint(checkpoint_path, dict(
            step=at, total_steps=total, epoch=at // per_epoch, position=at % per_epoch,  # position: steps into epoch
            config=config.as_dict(), world_size=world,
            trainable={n: p.detach().cpu() for n, p in trainable.items()}, optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(), scaler=None if scaler is None else scaler.state_dict(),
            loss_curve=curve, seconds=seconds_before + time.monotonic() - started))

    for epoch in range(step // per_epoch, config.epochs):
        first = step - epoch * per_epoch
        items = epoch_items(len(dataset), config.seed, epoch, rank, world, per_epoch, config.batch_size, first)
        loader = epoch_loader(dataset, items, config.batch_size, config.workers, device.type == 'cuda')
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            scheduler.step_update(step)  # the learning rate of this step, whatever was resumed
            lr = _step_lr(optimizer)
            with torch.autocast('cuda', dtype=torch.float16, enabled=use_amp):
                mix_seed = sample_seed(config.seed, epoch, -1 - step)  # positions >= 0 are the images'
                images, targets = criterion.inputs_and_targets(images, labels, mix_seed)
                loss = criterion(forward(images), targets)
            mean_loss = _global_mean(loss)  # every rank decides on the same number
            if not math.isfinite(mean_loss):
                raise UserError(f"QwT* loss is {mean_loss} at step {step + 1} of {total} (learning rate {lr:.3g}): "
                                f"the last good checkpoint {checkpoint_path} is kept; rerun with a lower --finetune_lr")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler(loss, optimizer)
            else:
                loss.backward()
                optimizer.step()
            step += 1
            window_images += images.shape[0] * world
            if step % curve_every == 0 or step == total:
                curve.append([step, mean_loss])
            if step % config.checkpoint_every == 0 or step == total:
                save(step)
            bar.update(1)
            now = time.monotonic()
            if main and (step % log_every == 0 or step == total or now - window_start >= LOG_EVERY_S):
                _logger.info('QwT* step %d/%d: loss %.4f, lr %.3g, %.1f images/s', step, total, mean_loss, lr,
                             window_images / max(now - window_start, 1e-9))
                window_start, window_images = now, 0
    bar.close()
    finish_finetune(model)
    seconds = seconds_before + time.monotonic() - started
    return FinetuneResult(total, total * config.batch_size * world, curve, seconds, resumed_from,
                          recipe_of(config, world, total, per_epoch, use_amp))
