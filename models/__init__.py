"""Model construction: timm 0.4.12 ViT / DeiT / Swin with attention products as modules, ResNets, and the
model-specific pieces QwT needs (stem and block walk). Names resolve lazily (PEP 562), so importing
``models.registry`` to check flags does not import torch or timm."""
import importlib

_EXPORTS = {
    'models.build': ('build_model', 'prepare_model', 'load_weights', 'load_tensors', 'UntrustedObjects',
                     'pretrained_cached', 'pretrained_location',
                     'randomize_layernorms', 'state_dict_mismatches', 'family_of', 'stem', 'walk'),
    'models.registry': ('MODELS', 'ModelSpec', 'data_config', 'default_cfg', 'resolve_model'),
    'models.attention': ('MatMul',),
    'models.slot': ('Slot',),
    'models.resnet': ('block_channels', 'randomize_batchnorms'),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value
