"""Model construction: timm 0.4.12 ViT / DeiT / Swin with attention products as modules, ResNets as timm
builds them, and the model-specific pieces QwT needs (stem and block walk)."""
import os
import pickle
import re
from urllib.parse import urlparse

import torch
from timm.models.resnet import ResNet
from timm.models.swin_transformer import SwinTransformer, WindowAttention as TimmWindowAttention
from timm.models.vision_transformer import Attention as TimmAttention, VisionTransformer

from models import resnet, swin, vit
from models.attention import Attention, MatMul, WindowAttention
from models.registry import MODELS, ModelSpec, data_config, default_cfg, resolve_model
from models.slot import Slot
from utils.core.errors import UserError, cause


def prepare_model(model):
    """Swap timm's attention for the versions with ``matmul1``/``matmul2`` modules; eval mode."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is TimmAttention:
                setattr(module, name, Attention(child))
            elif type(child) is TimmWindowAttention:
                setattr(module, name, WindowAttention(child))
    return model.eval()


class UntrustedObjects(Exception):
    """A file that ``torch.load(weights_only=True)`` refuses: it pickles objects other than tensors
    and plain containers (``args``: the first such class, e.g. argparse.Namespace)."""


def load_tensors(path, trust=False):
    """``torch.load`` on the CPU that unpickles only tensors, numbers, strings and plain containers,
    unless ``trust``: unpickling other objects can run code. Raises ``UntrustedObjects`` where the
    file needs more, anything else ``torch.load`` raises otherwise."""
    try:
        return torch.load(path, map_location='cpu', weights_only=not trust)
    except pickle.UnpicklingError as e:
        found = re.search(r'Unsupported global: GLOBAL ([\w.]+)', str(e))
        if trust or found is None:
            raise
        raise UntrustedObjects(found.group(1)) from None


def _read_state_dict(checkpoint, trust=False):
    """The tensors of a ``.pth`` file: a state dict, or one under 'model' / 'state_dict'."""
    try:
        state = load_tensors(checkpoint, trust)
    except UntrustedObjects as e:
        raise UserError(
            f"checkpoint {checkpoint} holds Python objects other than tensors ({e.args[0]}), which are not "
            "unpickled unless trusted: re-save its state dict, e.g. python -c \"import torch; torch.save(torch.load("
            f"'{checkpoint}', weights_only=False)['model'], 'weights.pth')\", or pass --trust_checkpoint if you "
            "trust the file") from None
    except Exception as e:
        raise UserError(f"cannot read checkpoint {checkpoint} ({cause(e)}): "
                        "expected a .pth state dict saved with torch.save") from None
    if isinstance(state, dict) and 'format' in state and 'state_dict' in state:  # any --save format version
        raise UserError(f"checkpoint {checkpoint} is a quantized model written by --save: evaluate it with --load")
    for key in ('model', 'state_dict'):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"checkpoint {checkpoint} holds no state dict of tensors (found {type(state).__name__}): "
                        "expected the output of torch.save(model.state_dict(), PATH)")
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}


def _first(names, n=3):
    return ', '.join(names[:n]) + (f' and {len(names) - n} more' if len(names) > n else '')


# BatchNorm's step counter: checkpoints saved before torch 0.4.1 (torchvision's and others' older ResNet
# files) lack it, and torch's BatchNorm fills it in on loading; it plays no part at inference.
OPTIONAL_KEYS = ('num_batches_tracked',)


def state_dict_mismatches(expected, state):
    """What keeps ``state`` from loading into a model whose state dict is ``expected`` (empty: fits)."""
    problems = []
    missing = [k for k in expected if k not in state and k.rsplit('.', 1)[-1] not in OPTIONAL_KEYS]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing:
        problems.append(f"missing keys {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_first(unexpected)}")
    if shapes:
        problems.append(f"shapes (checkpoint vs model) {_first(shapes)}")
    return problems


def load_weights(model, checkpoint, model_name=None, trust=False):
    """Load a local checkpoint: a ``.pth`` state dict (optionally under 'model' / 'state_dict'), or a
    timm ``.npz`` (vit_*) through the model's own loader. A file that does not fit is an error naming
    the first mismatching keys. ``trust`` (``--trust_checkpoint``): also unpickle objects other than
    tensors and plain containers."""
    name = model_name or type(model).__name__
    if not os.path.isfile(checkpoint):
        raise UserError(f"checkpoint {checkpoint} not found: pass the path of a local .pth or .npz file")
    if checkpoint.endswith('.npz'):
        if not hasattr(model, 'load_pretrained'):
            raise UserError(f"{name} cannot read .npz checkpoints: convert {checkpoint} to a .pth state dict")
        try:
            model.load_pretrained(checkpoint)
        except Exception as e:
            raise UserError(f"cannot load {checkpoint} into {name} ({cause(e)}): "
                            "is it the .npz of this model?") from None
        return model
    state = _read_state_dict(checkpoint, trust)
    problems = state_dict_mismatches(model.state_dict(), state)
    if problems:
        raise UserError(f"checkpoint {checkpoint} does not fit {name}: {'; '.join(problems)}. "
                        "Pass the checkpoint of this model, or the --model it was trained as")
    model.load_state_dict(state)
    return model


def pretrained_location(timm_name):
    """(url, file name, folder) of timm's pretrained download for ``timm_name``: where to place the file
    so that timm finds it without network."""
    url = default_cfg(timm_name).get('url', '')
    if url.startswith('file://'):  # weights shipped with this repository (models/digits)
        return url, os.path.basename(url[len('file://'):]), os.path.dirname(url[len('file://'):])
    return url, os.path.basename(urlparse(url).path), os.path.join(torch.hub.get_dir(), 'checkpoints')


def pretrained_cached(timm_name):
    """Whether timm's pretrained weights for ``timm_name`` are already in the local cache."""
    _, filename, folder = pretrained_location(timm_name)
    return bool(filename) and os.path.isfile(os.path.join(folder, filename))


def build_model(name, pretrained=True, checkpoint=None, trust_checkpoint=False):
    """The timm model ``name`` (short table name or timm name) in eval mode, ready for quantization.

    Weights: ``checkpoint`` if given (nothing is downloaded; ``trust_checkpoint``: see ``load_weights``),
    else timm's pretrained download when ``pretrained``, else random initialisation.
    """
    import timm
    spec = resolve_model(name)
    download = pretrained and checkpoint is None
    if download and spec.family == 'resnet':  # SPEC §3b: the published weights come from local files only
        raise UserError(f"{spec.name}: timm's pretrained weights are another training than the published ones and "
                        "are never downloaded here: pass the published weights file as checkpoint (--checkpoint)")
    try:
        model = timm.create_model(spec.timm_name, pretrained=download, drop_path_rate=0.0)
    except Exception as e:
        if not download:
            raise
        url, filename, folder = pretrained_location(spec.timm_name)
        cached = os.path.join(folder, filename)
        if os.path.isfile(cached):
            raise UserError(f"cannot read the cached weights {cached} ({cause(e)}): "
                            "delete the file and run again to download "
                            "it anew, or pass --checkpoint PATH") from None
        raise UserError(f"could not get the pretrained weights of {spec.timm_name} ({cause(e)}). "
                        f"Offline: download {url} on a machine with network and "
                        f"either place {filename} in {folder}/ or pass --checkpoint PATH/{filename}") from None
    if checkpoint is not None:
        load_weights(model, checkpoint, spec.timm_name, trust_checkpoint)
    return prepare_model(model)


@torch.no_grad()
def randomize_layernorms(model, seed=0):
    """Trained-like LayerNorm affine parameters for a random-weight model: with the initial gamma = 1,
    beta = 0 the normalised features are exactly collinear with the bias column of the QwT regression,
    which no trained model has. A generator of its own leaves the global one to the draws of SPEC §1b."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return model


def family_of(model):
    if isinstance(model, ResNet):
        return resnet
    if isinstance(model, SwinTransformer):
        return swin
    if isinstance(model, VisionTransformer):
        return vit
    raise TypeError(f"{type(model).__name__} is not a timm VisionTransformer, SwinTransformer or ResNet")


def stem(model, x):
    """The input of the first block (model-specific)."""
    return family_of(model).stem(model, x)


def walk(model):
    """The blocks (and Swin PatchMerging layers) in forward order, as replaceable slots (ResNet: the residual
    blocks of layer1..layer4)."""
    return list(family_of(model).walk(model))
