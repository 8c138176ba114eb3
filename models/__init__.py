"""Model construction: timm 0.4.12 ViT / DeiT / Swin with attention products as modules, and the
model-specific pieces QwT needs (stem and block walk)."""
import os

import torch
from timm.models.swin_transformer import SwinTransformer, WindowAttention as TimmWindowAttention
from timm.models.vision_transformer import Attention as TimmAttention, VisionTransformer

from models import swin, vit
from models.attention import Attention, MatMul, WindowAttention
from models.registry import MODELS, ModelSpec, resolve_model
from models.walk import Slot

__all__ = ['build_model', 'prepare_model', 'load_weights', 'resolve_model', 'family_of', 'stem', 'walk',
           'MODELS', 'ModelSpec', 'MatMul', 'Slot']


def prepare_model(model):
    """Swap timm's attention for the versions with ``matmul1``/``matmul2`` modules; eval mode."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is TimmAttention:
                setattr(module, name, Attention(child))
            elif type(child) is TimmWindowAttention:
                setattr(module, name, WindowAttention(child))
    return model.eval()


def load_weights(model, checkpoint):
    """Load a local checkpoint: a ``.pth`` state dict (optionally under 'model' / 'state_dict'), or a
    timm ``.npz`` (vit_*) through the model's own loader."""
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint!r} not found: pass the path of a local .pth or .npz file")
    if checkpoint.endswith('.npz'):
        if not hasattr(model, 'load_pretrained'):
            raise ValueError(f"{type(model).__name__} cannot read .npz checkpoints: convert {checkpoint} to a .pth state dict")
        model.load_pretrained(checkpoint)
        return model
    state = torch.load(checkpoint, map_location='cpu')
    for key in ('model', 'state_dict'):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {checkpoint!r} does not fit {type(model).__name__}: "
                         f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    return model


def build_model(name, pretrained=True, checkpoint=None):
    """The timm model ``name`` (short table name or timm name) in eval mode, ready for quantization.

    Weights: ``checkpoint`` if given (nothing is downloaded), else timm's pretrained download when
    ``pretrained``, else random initialisation.
    """
    import timm
    spec = resolve_model(name)
    download = pretrained and checkpoint is None
    try:
        model = timm.create_model(spec.timm_name, pretrained=download, drop_path_rate=0.0)
    except (OSError, RuntimeError) as e:
        if not download:
            raise
        raise OSError(f"could not get timm's pretrained weights for {spec.timm_name} ({type(e).__name__}: {e}); "
                      "without network, download the file elsewhere and pass --checkpoint PATH") from e
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return prepare_model(model)


def family_of(model):
    if isinstance(model, SwinTransformer):
        return swin
    if isinstance(model, VisionTransformer):
        return vit
    raise TypeError(f"{type(model).__name__} is not a timm VisionTransformer or SwinTransformer")


def stem(model, x):
    """The input of the first block (model-specific)."""
    return family_of(model).stem(model, x)


def walk(model):
    """The blocks (and Swin PatchMerging layers) in forward order, as replaceable slots."""
    return list(family_of(model).walk(model))
