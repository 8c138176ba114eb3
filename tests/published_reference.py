"""SPEC §1b written out by hand with plain torch / torchvision / timm 0.4.12 calls, independent of the
project's code: the calibration batch and QwT images a published run draws on a folder. Tests hold
``--dump_inputs`` against it bit for bit."""
import os
import random

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import ImageDataset
from timm.data.auto_augment import rand_augment_transform
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import transforms as T


class _WithIndex(Dataset):
    """timm's ImageDataset sample plus its index, so the test can name the files (draws nothing)."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        img, target = self.base[i]
        return img, target, i


def train_transform(mean, std, size=224):
    """SPEC §1's training-split transform, op by op."""
    ra = rand_augment_transform('rand-m9-mstd0.5-inc1', dict(
        translate_const=int(size * 0.45), img_mean=tuple(round(255 * m) for m in mean), interpolation=Image.BICUBIC))
    return T.Compose([RandomResizedCropAndInterpolation(size, interpolation='bicubic'), T.RandomHorizontalFlip(),
                      ra, T.ToTensor(), T.Normalize(torch.tensor(mean), torch.tensor(std))])


def _loader(dataset, batch_size, workers, world_size, rank):
    if world_size == 1:
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, pin_memory=False,
                          drop_last=True, persistent_workers=False)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank)  # seed 0, no set_epoch
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=False,
                      drop_last=True, persistent_workers=False)


def published_inputs(data_dir, timm_name, checkpoint, mean, std, seed=0, batch_size=32, qwt_samples=512, workers=4,
                     world_size=1, rank=0):
    """(calibration batch of rank 0 when ``rank`` is 0, else this rank's own first batch; this rank's QwT
    images; their file names relative to DATA_DIR), drawn in the published order."""
    random.seed(seed)                      # 1. seed
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed(seed)
    train = ImageDataset(os.path.join(data_dir, 'train'), transform=train_transform(mean, std))
    names = [os.path.join('train', train.filename(i)) for i in range(len(train))]
    loader = _loader(_WithIndex(train), batch_size, workers, world_size, rank)
    calib, _, calib_idx = next(iter(loader))           # 2. first batch of the train loader
    model = timm.create_model(timm_name, pretrained=False, drop_path_rate=0.0)  # 3. model init draws
    model.load_state_dict(torch.load(checkpoint, map_location='cpu'))
    for _, m in model.named_modules():     # 4. the fresh layers of the published wrapping
        if isinstance(m, nn.Linear):
            nn.Linear(m.in_features, m.out_features)
        elif isinstance(m, nn.Conv2d):
            nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                      m.bias is not None)
    val = ImageDataset(os.path.join(data_dir, 'val'))
    iter(DataLoader(val, batch_size=batch_size, shuffle=False))  # 6. the evaluation loader's iteration
    n_batches = qwt_samples // batch_size // world_size
    qwt, qwt_idx = [], []
    for i, (img, _, idx) in enumerate(loader):          # 7. a new pass: the QwT images
        if i == n_batches:
            break
        qwt.append(img)
        qwt_idx += idx.tolist()
    return {'calib': calib, 'qwt': torch.cat(qwt), 'calib_files': [names[i] for i in calib_idx.tolist()],
            'qwt_files': [names[i] for i in qwt_idx]}


if __name__ == '__main__':  # as a script, for tools/capture_inputs.py: python published_reference.py DATA_DIR TIMM_NAME CKPT SEED
    import sys
    published_inputs(sys.argv[1], sys.argv[2], sys.argv[3], (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                     seed=int(sys.argv[4]))
