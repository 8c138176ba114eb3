"""The models of the published table (SPEC §1) and how any other timm ViT/DeiT/Swin name resolves."""
from dataclasses import dataclass

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from utils.errors import UserError

_HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ModelSpec:
    name: str            # as given on the command line
    timm_name: str
    family: str          # 'vit' (ViT and DeiT) or 'swin'
    mean: tuple = None   # None: take timm's default_cfg
    std: tuple = None
    crop_pct: float = None


def _row(name, timm_name, family, mean, std, crop_pct):
    return name, ModelSpec(name, timm_name, family, tuple(mean), tuple(std), crop_pct)


# SPEC §1. DeiT uses crop_pct 0.875 although timm 0.4.12's default_cfg says 0.9.
MODELS = dict([
    _row('vit_small', 'vit_small_patch16_224', 'vit', _HALF, _HALF, 0.9),
    _row('vit_base', 'vit_base_patch16_224', 'vit', _HALF, _HALF, 0.9),
    *[_row(f'deit_{s}{d}', f'deit_{s}{d}_patch16_224', 'vit', IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, 0.875)
      for s in ('tiny', 'small', 'base') for d in ('', '_distilled')],
    _row('swin_tiny', 'swin_tiny_patch4_window7_224', 'swin', IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, 0.9),
    _row('swin_small', 'swin_small_patch4_window7_224', 'swin', IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, 0.9),
])
_BY_TIMM_NAME = {spec.timm_name: spec for spec in MODELS.values()}


def resolve_model(name):
    """A short name of the table or any timm 0.4.12 ViT/DeiT/Swin name -> ModelSpec."""
    if name in MODELS:
        return MODELS[name]
    if name in _BY_TIMM_NAME:
        return _BY_TIMM_NAME[name]
    import timm
    from timm.models.registry import is_model_in_modules
    if name not in timm.list_models():
        raise UserError(f"unknown model {name!r}: use one of {', '.join(MODELS)} "
                         "or a timm 0.4.12 ViT/DeiT/Swin name such as deit_tiny_patch16_224")
    if name.startswith('swin_'):
        return ModelSpec(name, name, 'swin')
    if name.startswith('deit_'):
        return ModelSpec(name, name, 'vit', tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD), 0.875)
    # the ResNet-ViT hybrids (vit_*_r50_*, vit_*_resnet*) live in vision_transformer_hybrid: another stem
    if name.startswith('vit_') and is_model_in_modules(name, ['vision_transformer']):
        return ModelSpec(name, name, 'vit')
    raise UserError(f"model {name!r} is not a ViT, DeiT or Swin transformer: RepQ-ViT + QwT here supports "
                     "vit_*, deit_* and swin_* models")
