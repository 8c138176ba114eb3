"""``--demo``: the whole pipeline with no data set and no weights to fetch. A small ImageNet-layout
folder is drawn at run time (nothing stored in git) and the model is timm's pretrained one when its
weights are already in the local cache, else a random initialisation."""
import os

import numpy as np
from PIL import Image

# Sized to finish well within a minute on a 2-core CPU (swin_tiny costs 3.5x deit_tiny per image).
DEMO_DEFAULTS = {
    'vit': dict(model='deit_tiny', batch_size=16, qwt_samples=32, num_workers=2, eval_workers=2,
                allow_class_subset=True),
    'swin': dict(model='swin_tiny', batch_size=8, qwt_samples=16, num_val=16, num_workers=2,
                 eval_workers=2, allow_class_subset=True),
}
DEMO_CLASSES, DEMO_TRAIN_PER_CLASS, DEMO_VAL_PER_CLASS = 10, 6, 4


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


def make_demo_data(root):
    return make_image_folder(root, DEMO_CLASSES, DEMO_TRAIN_PER_CLASS, DEMO_VAL_PER_CLASS, size=(64, 80))
