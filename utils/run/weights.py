"""Where a ResNet run finds its float weights (SPEC §3b): the published files, never a download (timm's own
resnet weights are other trainings with other accuracies). Imports neither torch nor timm, so that a
missing file is a usage error before anything loads."""
import os
from dataclasses import dataclass

from utils.core.errors import UserError

# The published script reads pretrained_weights/<file> under its working folder.
PUBLISHED_FOLDER = 'pretrained_weights'


@dataclass(frozen=True)
class PublishedWeights:
    file: str
    source: str
    url: str


BRECQ = 'https://github.com/yhhhli/BRECQ/releases/download/v1.0/'
# The published README's weights table.
RESNET_WEIGHTS = {
    'resnet18': PublishedWeights('resnet18_imagenet.pth.tar', 'BRECQ release v1.0', BRECQ + 'resnet18_imagenet.pth.tar'),
    'resnet50': PublishedWeights('resnet50_imagenet.pth.tar', 'BRECQ release v1.0', BRECQ + 'resnet50_imagenet.pth.tar'),
    'resnet101': PublishedWeights('resnet101-63fe2227.pth', 'torchvision',
                                  'https://download.pytorch.org/models/resnet101-63fe2227.pth'),
}


def published_weights(timm_name):
    """The published weights of ``timm_name``, or None for a model the published table lacks."""
    return RESNET_WEIGHTS.get(timm_name)


def find_weights(timm_name, checkpoint=None, checkpoint_dir=None, cwd=None):
    """The weights file of a ResNet run: ``checkpoint`` as given, else the published file name in
    ``checkpoint_dir``, else in ``pretrained_weights/`` under ``cwd`` (the published script's place). A
    missing file is a UserError naming the file, where it was looked for and where it comes from."""
    if checkpoint is not None:
        if not os.path.isfile(checkpoint):
            raise UserError(f"--checkpoint {checkpoint} not found: pass the path of a local .pth or .pth.tar file")
        return checkpoint
    weights = published_weights(timm_name)
    if weights is None:
        raise UserError(f"{timm_name} has no published weights: pass --checkpoint FILE (nothing is downloaded)")
    places = ([checkpoint_dir] if checkpoint_dir is not None else []) + [
        os.path.join(cwd or os.getcwd(), PUBLISHED_FOLDER)]
    for folder in places:
        path = os.path.join(folder, weights.file)
        if os.path.isfile(path):
            return path
    raise UserError(f"{weights.file} not found in {' or '.join(f'{p}/' for p in places)}: download it from "
                    f"{weights.url} ({weights.source}, as the published README says) into one of them, or pass "
                    "--checkpoint FILE (nothing is downloaded)")
