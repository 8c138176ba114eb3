"""Data of SPEC §1 and §1b: timm 0.4.12's ImageDataset over ImageNet-layout folders, the evaluation and
training-split transforms (timm's), the loaders of the published runs, and the Pillow posterize fix
RandAugment needs."""
import logging
import os

import torch
from PIL import Image
from timm.data import ImageDataset as TimmImageDataset, auto_augment, create_transform
from timm.data.parsers.constants import IMG_EXTENSIONS
from torch.utils.data import DataLoader, DistributedSampler, Subset

from utils.core.errors import ImageDecodeError, UserError, cause

_logger = logging.getLogger('qwt')
IMG_SIZE = 224
RAND_AUGMENT = 'rand-m9-mstd0.5-inc1'
SKIP_RETRY = 50    # timm 0.4.12's _ERROR_RETRY: unreadable images in a row before ImageDataset gives up


def _posterize_zero_bits_black(img, bits_to_keep, **kwargs):
    """timm 0.4.12's posterize, except 0 bits gives a black image as Pillow < 13 did, instead of
    Pillow 13's ValueError. With 'inc1' RandAugment asks for 0 bits at magnitude >= 10 (9 + noise)."""
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return _posterize_zero_bits_black.timm_posterize(img, bits_to_keep, **kwargs)


def fix_posterize():
    """Route RandAugment's posterize ops through the 0-bit fix. AugmentOp looks its function up in
    timm.data.auto_augment.NAME_TO_OP when built, so call this before building a transform."""
    for name, fn in list(auto_augment.NAME_TO_OP.items()):
        if fn is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = _posterize_zero_bits_black
_posterize_zero_bits_black.timm_posterize = auto_augment.posterize


def eval_transform(mean, std, crop_pct, interpolation='bicubic', img_size=IMG_SIZE):
    """Resize(int(img_size / crop_pct), interpolation) -> CenterCrop(img_size) -> ToTensor -> Normalize."""
    return create_transform(img_size, is_training=False, interpolation=interpolation, mean=mean, std=std,
                            crop_pct=crop_pct)


def train_transform(mean, std, interpolation='bicubic', img_size=IMG_SIZE):
    """RandomResizedCrop(img_size, bicubic) -> flip -> RandAugment rand-m9-mstd0.5-inc1 -> ToTensor ->
    Normalize. timm sets RandAugment's translate_const = int(img_size * 0.45), img_mean from ``mean``
    and bicubic for its geometric ops."""
    fix_posterize()
    return create_transform(img_size, is_training=True, auto_augment=RAND_AUGMENT, interpolation=interpolation,
                            mean=mean, std=std, re_prob=0.)


class ImageDataset(TimmImageDataset):
    """timm 0.4.12's ``ImageDataset`` (SPEC §1b: natural order of the path, .png/.jpg/.jpeg in any case,
    an unreadable image replaced by the next index, up to 50 in a row), with provenance: a sample is
    ``(image, target, index used, skip note)``. The note lists the files skipped to reach that index,
    one ``path<TAB>cause`` per line ('' normally), so the run can log and report them; ``strict``: the
    first unreadable file is an error instead."""

    def __init__(self, root, split_name, transform=None, strict=False):
        super().__init__(root, transform=transform)
        self.split_name = split_name
        self.strict = strict

    @property
    def classes(self):
        return list(self.parser.class_to_idx)

    def relpath(self, index):
        """The file of ``index``, relative to DATA_DIR (``train/<class>/<file>``)."""
        return os.path.join(self.split_name, self.parser.filename(index))

    def __getitem__(self, index):
        skipped = []
        while True:
            fh, target = self.parser[index]
            try:
                with fh:
                    img = Image.open(fh).convert('RGB')
                break
            except Exception as e:  # any unreadable file: timm skips it alike
                if self.strict:
                    raise ImageDecodeError(f"cannot decode image {self.parser.filename(index, absolute=True)} "
                                           f"({cause(e)}): replace or remove the file, or leave out "
                                           "--strict_images to skip it as timm does") from None
                skipped.append(f'{self.relpath(index)}\t{cause(e)}')
                if len(skipped) == SKIP_RETRY:
                    raise ImageDecodeError(f"{SKIP_RETRY} unreadable images in a row in {self.parser.root}, the "
                                           f"last {skipped[-1].replace(chr(9), ' (')}): check the folder") from None
                index = (index + 1) % len(self)
        if self.transform is not None:
            img = self.transform(img)
        return img, target, index, '\n'.join(skipped)


def image_dataset(data_dir, split, transform=None, strict=False):
    """``DATA_DIR/<split>/<class>/*`` through timm's ImageDataset, or a one-line error naming the problem."""
    root = os.path.join(data_dir, split)
    if not os.path.isdir(root):
        raise UserError(f"{split}/ not found under {data_dir} (expected {data_dir}/{split}/<class>/*)")
    class_dirs = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not class_dirs:
        raise UserError(f"no class folders in {root} (expected {root}/<class>/*.JPEG)")
    empty = [c for c in class_dirs if not _has_image(os.path.join(root, c))]
    if empty:  # timm would silently drop the class and shift every later label
        raise UserError(f"no images in class folder(s) {', '.join(empty[:5])} of {root} (expected "
                        f"{root}/<class>/*.JPEG; extensions {' '.join(IMG_EXTENSIONS)})")
    return ImageDataset(root, split, transform=transform, strict=strict)


def _has_image(folder):
    return any(os.path.splitext(f)[1].lower() in IMG_EXTENSIONS for _, _, files in os.walk(folder) for f in files)


def val_subset(dataset, num):
    """A fixed subset of ``num`` images for quick checks: the same for every seed, process count and
    run (a permutation from its own generator, seed 0), spread over the classes, in file order."""
    if not 1 <= num <= len(dataset):
        raise UserError(f"--num_val {num} is outside 1..{len(dataset)}, the size of the val split")
    if num == len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:num]
    return Subset(dataset, order.sort().values.tolist())


def available_cpus():
    """The CPUs this process may run on, as torch's DataLoader counts them."""
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


def workers_note(num_workers, cpus):
    """The project's one line where the training loader has more workers than CPUs (torch's own warning, at
    every loader iteration, is silenced): why the published default stays, or None."""
    if num_workers <= cpus:
        return None
    return (f"--num_workers {num_workers} on {cpus} CPU(s): the workers share the CPUs (slower loading), but each "
            "worker's seed decides the augmentation of the images it loads, so fewer workers would draw other "
            "images than the published run (SPEC §1b); kept")


def train_loader(dataset, batch_size, num_workers, dist_info):
    """The published training-split loader (SPEC §1b). One process: shuffled by the global generator, so
    each iteration draws a base seed and a new order. Several: ``DistributedSampler`` with its defaults
    (seed 0) and no ``set_epoch``, so every iteration sees the same order."""
    common = dict(batch_size=batch_size, num_workers=num_workers, drop_last=True,
                  pin_memory=dist_info.device.type == 'cuda', persistent_workers=False)
    if not dist_info.distributed:
        return DataLoader(dataset, shuffle=True, **common)
    sampler = DistributedSampler(dataset, num_replicas=dist_info.world_size, rank=dist_info.rank)
    return DataLoader(dataset, sampler=sampler, **common)


def eval_loader(dataset, batch_size, num_workers, dist_info):
    """Val loader over this process's shard rank::world_size, so every image counts exactly once."""
    if dist_info.distributed:
        dataset = Subset(dataset, range(dist_info.rank, len(dataset), dist_info.world_size))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=dist_info.device.type == 'cuda')


def replay_loader_iteration_draw():
    """The one draw from torch's global generator that starting an iteration of a sequential DataLoader
    makes (its workers' base seed), for a published loader iteration this run does not make."""
    torch.empty((), dtype=torch.int64).random_()


class ImageLog:
    """The files a run used and the unreadable ones it skipped (SPEC §1b provenance); each skipped
    file is logged once, on one warning line."""

    def __init__(self):
        self.skipped = []

    def files(self, dataset, batch):
        """The files of a loader batch ``(images, targets, indices used, skip notes)``, relative to
        DATA_DIR; records its skips."""
        self.note_skips(batch[3])
        base = dataset.dataset if isinstance(dataset, Subset) else dataset
        return [base.relpath(i) for i in batch[2].tolist()]

    def note_skips(self, notes):
        for note in notes:
            for line in filter(None, note.split('\n')):
                path, reason = line.split('\t', 1)
                if path not in self.skipped:
                    _logger.warning('skipped unreadable image %s (%s); the next image was used instead, as timm '
                                    'does (--strict_images stops instead)', path, reason)
                    self.skipped.append(path)
