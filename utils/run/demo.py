"""``--demo``: the whole pipeline with no data set and no weights to fetch.

By default the model of the script trained on real images, the UCI handwritten digits (``vit_digits``,
``swin_digits``; models/digits), on an ImageNet-layout folder of the digits written at run time, at bits low
enough that RepQ-ViT visibly loses accuracy: FP, RepQ-ViT and RepQ-ViT + QwT top-1 on the 500 held-out
digits. ``--demo --model deit_tiny`` (any other model) is the full-size run on a small generated folder with
timm's pretrained weights where they are already in the local cache, else a random initialisation (chance
accuracy: it shows that every stage runs)."""
import os

import numpy as np
from PIL import Image

from models.registry import DIGITS_MODELS
from utils.core.cpu_numerics import pin_line

# resnet_digits: the weight bits where Percentile visibly loses accuracy. Its convolutions read 8-bit inputs as
# published whatever --a_bits says (SPEC §3b), and fc reads 8 bits: W2/A8 is what runs, so the demo says A8
# (--a_bits 4 --conv_a_bits a_bits is the demo at real 4-bit conv inputs).
RESNET_DEMO_W, RESNET_DEMO_A = 2, 8
# its blocks read 64 channels: 32 per group gives the QwT convolutions 2 groups (the published 64 would give 1)
RESNET_DEMO_FACTOR = 32
# (W, A) of the digits demo: where RepQ-ViT visibly loses accuracy on these small models and QwT gives some
# back (measured: tests/test_digits.py, models/digits/README.md). The ViT keeps its accuracy at W3/A3.
DEMO_BITS = {'vit_digits': (2, 4), 'swin_digits': (3, 3), 'resnet_digits': (RESNET_DEMO_W, RESNET_DEMO_A)}
# The digits demo: 32 calibration and 256 QwT images of the 1,297 training digits; all 500 held-out digits.
DIGITS_DEMO = {
    family: dict(model=model, w_bits=DEMO_BITS[model][0], a_bits=DEMO_BITS[model][1], batch_size=32,
                 qwt_samples=256, num_workers=2, eval_workers=2, eval='all')
    for family, model in (('vit', 'vit_digits'), ('swin', 'swin_digits'), ('resnet', 'resnet_digits'))
}
DIGITS_DEMO['resnet']['factor'] = RESNET_DEMO_FACTOR
# Sized to finish well within a minute on a 2-core CPU (swin_tiny costs 3.5x deit_tiny per image).
RANDOM_DEMO = {
    'vit': dict(model='deit_tiny', batch_size=16, qwt_samples=32, num_workers=2, eval_workers=2,
                allow_class_subset=True),
    'swin': dict(model='swin_tiny', batch_size=8, qwt_samples=16, num_val=16, num_workers=2,
                 eval_workers=2, allow_class_subset=True),
    'resnet': dict(model='resnet18', batch_size=8, qwt_samples=16, num_val=16, num_workers=2, eval_workers=2,
                   allow_class_subset=True),
}
DEMO_CLASSES, DEMO_TRAIN_PER_CLASS, DEMO_VAL_PER_CLASS = 10, 6, 4
# CPU threads of a --demo run: a matrix product split over another number of threads sums in another order,
# which can move a fake-quantized activation across a rounding step and a digit's prediction with it. One
# thread makes the figures independent of the core count, and the digits demos' pinned kernels
# (utils.core.cpu_numerics, set by utils.run.cli before torch loads) independent of the x86-64 CPU
# (tools/readme_figures.py writes the README's figures with both).
DEMO_THREADS = 1


def demo_defaults(family, model=None):
    """The flag defaults of ``--demo`` for ``--model`` (None: the family's digits model)."""
    return DIGITS_DEMO[family] if model is None or model in DIGITS_MODELS else RANDOM_DEMO[family]


def make_image_folder(root, classes=3, train_per_class=4, val_per_class=2, size=(40, 56), seed=0):
    """``root/{train,val}/n0000000c/i.JPEG`` with random-colour images whose mean colour depends on
    the class. Returns ``root``."""
    rng = np.random.RandomState(seed)
    for split, n in (('train', train_per_class), ('val', val_per_class)):
        for c in range(classes):
            folder = os.path.join(root, split, f'n{c:08d}')
            os.makedirs(folder, exist_ok=True)
            base = rng.randint(0, 256, 3)
            for i in range(n):
                noise = rng.randint(-60, 61, (*size, 3))
                pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f'{i}.JPEG'))
    return root


def make_demo_data(root, model=None):
    """The demo's folder: the digits (training and held-out) for a digits model, else generated images."""
    if model is None or model in DIGITS_MODELS:
        from models.digits import write_image_folder
        return write_image_folder(root)
    return make_image_folder(root, DEMO_CLASSES, DEMO_TRAIN_PER_CLASS, DEMO_VAL_PER_CLASS, size=(64, 80))


def demo_line(model, w_bits, a_bits, method='RepQ-ViT'):
    """What the demo shows, for its log."""
    if model in DIGITS_MODELS:
        return (f'demo: {model}, trained on the UCI handwritten digits (models/digits), at W{w_bits}/A{a_bits}, '
                f'low enough that {method} visibly loses accuracy; FP, {method} and {method} + QwT top-1 on the 500 '
                'held-out digits')
    weights = 'random weights' if method == 'Percentile' else 'timm weights if cached, else random'  # ResNet: never timm's
    return (f'demo: {model} W{w_bits}/A{a_bits} on a small generated folder, {weights} (chance accuracy: this shows '
            'that every stage runs)')


def demo_threads_line(threads, capability):
    """The thread count and CPU kernels the demo's figures hold for (utils.core.cpu_numerics), for its log."""
    return pin_line(capability, threads)
