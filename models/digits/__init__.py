"""Two small timm models trained on real images: the UCI handwritten digits (scikit-learn's copy, 1,797
8x8 scans, 10 classes; see README.md here), upsampled to 32x32.

Importing this package registers ``vit_digits`` (a timm VisionTransformer) and ``swin_digits`` (a timm
SwinTransformer) with timm, so ``timm.create_model('vit_digits', pretrained=True)`` builds the model and
loads the weights committed beside this file (nothing is downloaded), and the project's model names
resolve them like any other timm name. ``write_image_folder(root)`` writes the digits as an
ImageNet-layout folder (``root/train/<class>/*.png``, ``root/val/<class>/*.png``), so the project's real
data path (timm's ImageDataset, the training-split transform for calibration and QwT, the evaluation
transform) runs on them.

The arrays need numpy only; the data came from scikit-learn once (``tools/train_digits.py --make-npz``)
and scikit-learn is not needed at run or test time.
"""
import os

import numpy as np
import torch
from timm.models.registry import register_model
from timm.models.resnet import BasicBlock, ResNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_FILE = os.path.join(HERE, 'digits.npz')
NUM_CLASSES = 10
CLASSES = tuple(str(c) for c in range(NUM_CLASSES))  # folder names sort in label order
IMG_SIZE = 32
SOURCE_SIZE = 8
MAX_VALUE = 16  # the scans count set pixels in 4x4 blocks: 0..16
# Mean and std of the training images (upsampled, 0..1), rounded; the same for the three channels of the
# grey images.
MEAN = (0.31, 0.31, 0.31)
STD = (0.32, 0.32, 0.32)

VIT_ARCH = dict(img_size=IMG_SIZE, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0)
SWIN_ARCH = dict(img_size=IMG_SIZE, patch_size=4, embed_dim=40, depths=(2, 2), num_heads=(2, 4), window_size=4,
                 mlp_ratio=4.0)
# timm's ResNet with BasicBlocks, two stages (64 channels at 8x8, then a stride-2 stage of 128 at 4x4): timm
# 0.4.12 fixes the stage widths at 64..512, so the last two stages are left empty and the classifier reads 128.
RESNET_ARCH = dict(layers=(2, 1, 0, 0))


def _digits_resnet(num_classes, drop_path_rate=0.0, layers=RESNET_ARCH['layers'], **kwargs):
    model = ResNet(BasicBlock, list(layers), num_classes=num_classes, drop_path_rate=drop_path_rate, **kwargs)
    model.num_features = 64 * 2 ** (sum(n > 0 for n in layers) - 1)
    model.fc = torch.nn.Linear(model.num_features, num_classes)
    return model


ARCHS = {'vit_digits': (VisionTransformer, VIT_ARCH), 'swin_digits': (SwinTransformer, SWIN_ARCH),
         'resnet_digits': (_digits_resnet, RESNET_ARCH)}
WEIGHTS = {name: os.path.join(HERE, f'{name}.pth') for name in ARCHS}


def _cfg(name):
    # a file:// url: the project's weight lookup (models.build.pretrained_location) finds the shipped file
    resnet = name.startswith('resnet')
    return {'url': 'file://' + WEIGHTS[name], 'num_classes': NUM_CLASSES, 'input_size': (3, IMG_SIZE, IMG_SIZE), 'pool_size': None,
            'crop_pct': 1.0, 'interpolation': 'bicubic', 'mean': MEAN, 'std': STD,
            'first_conv': 'conv1' if resnet else 'patch_embed.proj', 'classifier': 'fc' if resnet else 'head'}


# timm's register_model copies the entry of its function's name into timm's table of default_cfgs.
default_cfgs = {name: _cfg(name) for name in ARCHS}


def build(name, pretrained=False, **kwargs):
    """``name`` ('vit_digits' or 'swin_digits'), its committed weights loaded when ``pretrained``."""
    cls, arch = ARCHS[name]
    kwargs = {'num_classes': NUM_CLASSES, 'drop_path_rate': 0.0, **arch, **kwargs}
    model = cls(**kwargs)
    model.default_cfg = dict(default_cfgs[name])
    if pretrained:  # (resnet_digits is stored in float16, loaded into float32)
        model.load_state_dict(torch.load(WEIGHTS[name], map_location='cpu', weights_only=True))
    return model


@register_model
def resnet_digits(pretrained=False, **kwargs):
    """timm ResNet, BasicBlocks (2, 1, 0, 0): 32x32 input, stem to 8x8 x 64, a stride-2 block to 4x4 x 128, fc."""
    return build('resnet_digits', pretrained, **kwargs)


@register_model
def vit_digits(pretrained=False, **kwargs):
    """timm VisionTransformer: 32x32 input, patch 4 (64 tokens + class token), dim 64, depth 4, 4 heads."""
    return build('vit_digits', pretrained, **kwargs)


@register_model
def swin_digits(pretrained=False, **kwargs):
    """timm SwinTransformer: 32x32 input, patch 4 (8x8 tokens), window 4, embed 40, depths (2, 2), heads (2, 4);
    the second stage (4x4 tokens, dim 80) is one window."""
    return build('swin_digits', pretrained, **kwargs)


# ---- data -----------------------------------------------------------------------------------------

def load_arrays(path=DATA_FILE):
    """The digits as committed: 'images' uint8 [1797, 8, 8] (0..16), 'labels' uint8 [1797], 'test' bool
    [1797] (the 500 held-out digits), in scikit-learn's order."""
    with np.load(path) as data:
        return {k: data[k] for k in ('images', 'labels', 'test')}


def _bilinear_matrix(src, dst):
    """[dst, src] weights of bilinear resampling with half-pixel centres (align_corners=False)."""
    pos = np.clip((np.arange(dst) + 0.5) * src / dst - 0.5, 0, src - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, src - 1)
    frac = pos - lo
    m = np.zeros((dst, src))
    m[np.arange(dst), lo] += 1 - frac
    m[np.arange(dst), hi] += frac
    return m


def upsample(images, size=IMG_SIZE):
    """uint8 [N, 8, 8] scans (0..16) -> uint8 [N, size, size] grey images (0..255), bilinear, in float64
    with numpy alone (the same pixels on every machine)."""
    m = _bilinear_matrix(images.shape[-1], size)
    x = images.astype(np.float64) * (255.0 / MAX_VALUE)
    return np.clip(np.rint(m @ x @ m.T), 0, 255).astype(np.uint8)


def split(part, data=None):
    """(images uint8 [N, 32, 32], labels int64 [N], indices into the arrays) of ``part``, 'train' (1,297
    digits) or 'test' (500), in scikit-learn's order."""
    data = load_arrays() if data is None else data
    if part not in ('train', 'test'):
        raise ValueError(f"part must be 'train' or 'test', not {part!r}")
    keep = data['test'] if part == 'test' else ~data['test']
    index = np.flatnonzero(keep)
    return upsample(data['images'][index]), data['labels'][index].astype(np.int64), index


def to_tensor(images, mean=MEAN, std=STD):
    """uint8 [N, H, W] grey images -> normalised float [N, 3, H, W], the pixels the evaluation transform
    makes of the PNG files (Resize and CenterCrop are no-ops at crop_pct 1.0, ToTensor, Normalize)."""
    x = torch.from_numpy(images).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def write_image_folder(root, data=None):
    """Write ``root/train/<class>/<index>.png`` (the 1,297 training digits) and ``root/val/<class>/
    <index>.png`` (the 500 held-out digits): 32x32 grey PNGs, class folders '0'..'9', files named by
    the digit's index in scikit-learn's order (4 digits, so file order is index order). Returns root."""
    from PIL import Image
    for part, folder in (('train', 'train'), ('test', 'val')):
        images, labels, index = split(part, data)
        for c in CLASSES:
            os.makedirs(os.path.join(root, folder, c), exist_ok=True)
        for img, label, i in zip(images, labels, index):
            Image.fromarray(img).save(os.path.join(root, folder, CLASSES[label], f'{i:04d}.png'))
    return root
