"""The QwT* recipe (the flags of --finetune_*) and what a fine-tuning run returns."""
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from utils.core.errors import UserError

LOSSES = ('label', 'distill')


@dataclass(frozen=True)
class FinetuneConfig:
    """The paper publishes no QwT* recipe beyond "the QwT modules and the head, jointly, one epoch": every
    other value here is this project's choice (the frame is the published script's unused timm imports)."""
    epochs: int = 1                      # --finetune_epochs (0: no fine-tuning, QwT as published)
    max_images: Optional[int] = None     # --finetune_images: cap on images per epoch, over all processes
    batch_size: int = 32                 # --finetune_batch_size, per process
    lr: float = 1e-4                     # --finetune_lr: AdamW peak learning rate
    weight_decay: float = 0.0            # --finetune_wd (AdamW, decoupled; not on biases)
    warmup_steps: int = 0                # --finetune_warmup: linear warm-up from min_lr, in optimizer steps
    min_lr: float = 1e-6                 # end of the cosine schedule (and start of the warm-up)
    loss: str = 'distill'                # 'label': cross-entropy on labels; 'distill': soft targets = teacher's softmax
    mixup: float = 0.0                   # timm Mixup alpha (0: off)
    cutmix: float = 0.0                  # timm CutMix alpha (0: off)
    smoothing: float = 0.0               # label smoothing ('label' loss)
    checkpoint_every: int = 100          # steps between checkpoints (and one at the end)
    seed: int = 0                        # sampler order and per-image augmentation seeds
    amp: bool = True                     # float16 autocast + timm NativeScaler (CUDA only; the CPU runs float32)
    workers: int = 4                     # data-loader workers per process (the images do not depend on it)

    def validate(self):
        """Raise a one-line UserError naming the first bad value and the fix; returns self."""
        def bad(flag, value, fix):
            raise UserError(f"{flag} {value} {fix}")

        if not isinstance(self.epochs, int) or self.epochs < 0:
            bad('--finetune_epochs', self.epochs, 'must be a whole number >= 0 (0: QwT as published, 1: QwT*)')
        if self.max_images is not None and (not isinstance(self.max_images, int) or self.max_images < 1):
            bad('--finetune_images', self.max_images, 'must be a whole number >= 1 (or leave it out for whole epochs)')
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            bad('--finetune_batch_size', self.batch_size, 'must be a whole number >= 1 (images per process)')
        if not _positive(self.lr):
            bad('--finetune_lr', self.lr, 'must be a learning rate > 0, such as 1e-4')
        if not _non_negative(self.weight_decay):
            bad('--finetune_wd', self.weight_decay, 'must be >= 0, such as 0 or 0.05')
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            bad('--finetune_warmup', self.warmup_steps, 'must be a whole number of steps >= 0')
        if not _non_negative(self.min_lr) or self.min_lr > self.lr:
            bad('--finetune_min_lr', self.min_lr, f'must be >= 0 and at most the learning rate {self.lr}')
        if self.loss not in LOSSES:
            bad('--finetune_loss', repr(self.loss), f"is not one of {', '.join(LOSSES)}")
        for flag, value in (('--mixup', self.mixup), ('--cutmix', self.cutmix)):
            if not _non_negative(value):
                bad(flag, value, 'must be an alpha >= 0 (0: off)')
        if not _non_negative(self.smoothing) or self.smoothing >= 1:
            bad('--smoothing', self.smoothing, 'must be in [0, 1), such as 0.1')
        if (self.mixup or self.cutmix) and self.batch_size % 2:
            bad('--finetune_batch_size', self.batch_size, 'must be even with mixup or cutmix (timm Mixup pairs images)')
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 1:
            bad('--checkpoint_every', self.checkpoint_every, 'must be a whole number of steps >= 1')
        if not isinstance(self.workers, int) or self.workers < 0:
            bad('--workers', self.workers, 'must be a whole number >= 0')
        return self

    def as_dict(self):
        return dataclasses.asdict(self)


def _positive(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _non_negative(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


# Fields a resumed run may change without changing what it computes.
RESUMABLE_CHANGES = ('checkpoint_every', 'workers')


@dataclass
class FinetuneResult:
    steps: int                   # optimizer steps of the whole run (all epochs)
    images_seen: int             # steps x batch x processes
    loss_curve: list             # a short list of [step, mean loss over all processes]
    seconds: float               # training time, summed over resumed parts
    resumed_from: Optional[int]  # the step a checkpoint resumed from, None for a fresh run
    recipe: dict                 # the config plus optimizer, scheduler, processes and global batch
