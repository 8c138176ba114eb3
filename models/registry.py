"""The models of the published table (SPEC §1) and how any other timm ViT/DeiT/Swin name resolves.
Importing this module does not import torch or timm (flags are checked before either loads)."""
from dataclasses import dataclass

from utils.core.errors import UserError

_HALF = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm.data.IMAGENET_DEFAULT_MEAN / _STD
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    name: str            # as given on the command line
    timm_name: str
    family: str          # 'vit' (ViT and DeiT), 'swin' or 'resnet'
    mean: tuple = None   # None: take timm's default_cfg
    std: tuple = None
    crop_pct: float = None
    interpolation: str = None


def _row(name, timm_name, family, mean, std, crop_pct):
    return name, ModelSpec(name, timm_name, family, tuple(mean), tuple(std), crop_pct, 'bicubic')


# SPEC §1. DeiT uses crop_pct 0.875 although timm 0.4.12's default_cfg says 0.9.
MODELS = dict([
    _row('vit_small', 'vit_small_patch16_224', 'vit', _HALF, _HALF, 0.9),
    _row('vit_base', 'vit_base_patch16_224', 'vit', _HALF, _HALF, 0.9),
    *[_row(f'deit_{s}{d}', f'deit_{s}{d}_patch16_224', 'vit', IMAGENET_MEAN, IMAGENET_STD, 0.875)
      for s in ('tiny', 'small', 'base') for d in ('', '_distilled')],
    _row('swin_tiny', 'swin_tiny_patch4_window7_224', 'swin', IMAGENET_MEAN, IMAGENET_STD, 0.9),
    _row('swin_small', 'swin_small_patch4_window7_224', 'swin', IMAGENET_MEAN, IMAGENET_STD, 0.9),
    # SPEC §3b: the published ResNet script's transforms are bicubic (timm's resnet18 cfg says bilinear)
    *[_row(name, name, 'resnet', IMAGENET_MEAN, IMAGENET_STD, 0.875) for name in ('resnet18', 'resnet50', 'resnet101')],
])
_BY_TIMM_NAME = {spec.timm_name: spec for spec in MODELS.values()}
# Small models trained on the UCI digits (models/digits, the --demo models), registered with timm on first use.
DIGITS_MODELS = ('vit_digits', 'swin_digits', 'resnet_digits')
FAMILY_PREFIXES = {'vit': ('vit_', 'deit_'), 'swin': ('swin_',)}
RESNETS_SUPPORTED = 'Percentile + QwT supports resnet18, resnet50 and resnet101'



def table_names(family=None):
    """The short names of the published table, of one family or all."""
    return [n for n, s in MODELS.items() if family is None or s.family == family]


def resolve_model(name, family=None):
    """A short name of the table or any timm 0.4.12 ViT/DeiT/Swin name -> ModelSpec. Only names outside
    the table import timm. ``family`` narrows the names an unknown-model message suggests."""
    if name in MODELS:
        return MODELS[name]
    if name in _BY_TIMM_NAME:
        return _BY_TIMM_NAME[name]
    import timm
    from timm.models.registry import is_model_in_modules
    if name in DIGITS_MODELS:
        import models.digits  # noqa: F401  (registers them)
        if name.startswith('resnet'):
            return ModelSpec(name, name, 'resnet')
    if family == 'resnet':
        raise UserError(f"unknown model {name!r}: {RESNETS_SUPPORTED}")
    if name not in timm.list_models():
        prefixes = FAMILY_PREFIXES.get(family, ('vit_', 'deit_', 'swin_'))
        example = {'vit': 'deit_tiny_patch16_224', 'swin': 'swin_base_patch4_window7_224'}.get(
            family, 'deit_tiny_patch16_224')
        raise UserError(f"unknown model {name!r}: use one of {', '.join(table_names(family))} or a timm 0.4.12 "
                        f"{'/'.join(p.rstrip('_') for p in prefixes)} name such as {example}")
    if name.startswith('swin_'):
        return ModelSpec(name, name, 'swin')
    # the ResNet-ViT hybrids (vit_*_r50_*, vit_*_resnet*) live in vision_transformer_hybrid: another stem
    if name.startswith(('deit_', 'vit_')) and not is_model_in_modules(name, ['vision_transformer_hybrid']):
        return ModelSpec(name, name, 'vit')
    raise UserError(f"model {name!r} is not a ViT, DeiT or Swin transformer: RepQ-ViT + QwT here supports "
                    f"vit_*, deit_* and swin_* models ({RESNETS_SUPPORTED})")


def default_cfg(timm_name):
    """timm 0.4.12's ``default_cfg`` of ``timm_name`` without building the model (a build would draw from
    the global generator, SPEC §1b)."""
    from timm.models.registry import _model_default_cfgs
    return dict(_model_default_cfgs[timm_name])


def data_config(spec):
    """Input size, mean, std, crop_pct and interpolation of ``spec``'s transforms: SPEC §1 for the table
    models, timm's ``default_cfg`` for every other name (and the input size of all)."""
    cfg = default_cfg(spec.timm_name)
    return {'img_size': cfg['input_size'][-1],
            'mean': tuple(spec.mean or cfg['mean']), 'std': tuple(spec.std or cfg['std']),
            'crop_pct': spec.crop_pct or cfg['crop_pct'], 'interpolation': spec.interpolation or cfg['interpolation']}
