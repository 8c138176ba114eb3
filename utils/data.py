"""Data of SPEC §1: ImageNet-layout folders, the evaluation and training-split transforms (timm's),
loaders for one or many processes, and the Pillow posterize fix RandAugment needs."""
import os

import torch
from PIL import Image
from timm.data import auto_augment, create_transform
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from utils.errors import ImageDecodeError, UserError

IMG_SIZE = 224
RAND_AUGMENT = 'rand-m9-mstd0.5-inc1'


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


def eval_transform(mean, std, crop_pct):
    """Resize(int(224 / crop_pct), bicubic) -> CenterCrop(224) -> ToTensor -> Normalize."""
    return create_transform(IMG_SIZE, is_training=False, interpolation='bicubic', mean=mean, std=std,
                            crop_pct=crop_pct)


def train_transform(mean, std):
    """RandomResizedCrop(224, bicubic) -> flip -> RandAugment rand-m9-mstd0.5-inc1 -> ToTensor -> Normalize.
    timm sets RandAugment's translate_const = int(224 * 0.45), img_mean from ``mean`` and bicubic."""
    fix_posterize()
    return create_transform(IMG_SIZE, is_training=True, auto_augment=RAND_AUGMENT, interpolation='bicubic',
                            mean=mean, std=std, re_prob=0.)


def load_image(path):
    """An RGB image, or an error naming the file (the default loader's error names only the cause)."""
    try:
        with open(path, 'rb') as f:
            return Image.open(f).convert('RGB')
    except Exception as e:  # truncated, not an image, unreadable: all the same to the user
        raise ImageDecodeError(f"cannot decode image {path} ({type(e).__name__}: {e}): "
                               "replace or remove the file") from None


def image_folder(data_dir, split, transform):
    """``DATA_DIR/<split>/<class>/*`` as a torchvision ImageFolder (classes sorted, files sorted)."""
    root = os.path.join(data_dir, split)
    if not os.path.isdir(root):
        raise UserError(f"{split}/ not found under {data_dir} (expected {data_dir}/{split}/<class>/*)")
    try:
        return ImageFolder(root, transform=transform, loader=load_image)
    except FileNotFoundError as e:  # torchvision: no class folder, or a class folder without images
        msg = str(e)
        if 'class folder' in msg:
            raise UserError(f"no class folders in {root} (expected {root}/<class>/*.JPEG)") from None
        empty = msg.split('classes ', 1)[-1].split('. Supported', 1)[0]
        raise UserError(f"no images in class folder(s) {empty} of {root} (expected {root}/<class>/*.JPEG; "
                        f"extensions {' '.join(IMG_EXTENSIONS)})") from None


def val_subset(dataset, num):
    """A fixed subset of ``num`` images for quick checks: the same for every seed, process count and
    run (a permutation from its own generator, seed 0), spread over the classes, in file order."""
    if not 1 <= num <= len(dataset):
        raise UserError(f"--num_val {num} is outside 1..{len(dataset)}, the size of the val split")
    if num == len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:num]
    return Subset(dataset, order.sort().values.tolist())


def train_loader(dataset, batch_size, num_workers, seed, dist_info, epoch=0):
    """Shuffled training-split loader. One process: the global (seeded) RNG shuffles, so each new
    iteration draws a new order. Several: DistributedSampler(seed) with ``epoch`` selecting the order."""
    common = dict(batch_size=batch_size, num_workers=num_workers, drop_last=True,
                  pin_memory=dist_info.device.type == 'cuda', persistent_workers=False)
    if not dist_info.distributed:
        return DataLoader(dataset, shuffle=True, **common)
    sampler = DistributedSampler(dataset, num_replicas=dist_info.world_size, rank=dist_info.rank,
                                 shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return DataLoader(dataset, sampler=sampler, **common)


def eval_loader(dataset, batch_size, num_workers, dist_info):
    """Val loader over this process's shard rank::world_size, so every image counts exactly once."""
    if dist_info.distributed:
        dataset = Subset(dataset, range(dist_info.rank, len(dataset), dist_info.world_size))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=dist_info.device.type == 'cuda')
