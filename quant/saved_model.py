"""``--save`` / ``--load``: a quantized (and compensated) model in one file, so that a finished
calibration is never redone. The file holds the model's state dict (the reparameterised weights, every
quantizer's buffers: delta, zero point, flags; the QwT W and b, and after QwT* fine-tuning the trained W, b and head, with the
recipe in its meta), the bit widths and the model name;
loading rebuilds the same modules from timm's class (no download) and gives the same logits.

Format version 1 kept the quantizer parameters in a dict of their own beside the state dict: such a
file still loads (converted on reading)."""
import os

import torch
from torch import nn

from models import UntrustedObjects, build_model, family_of, load_tensors, resnet, state_dict_mismatches, walk
from quant.layers import QuantConv2d, QuantLinear, quantizers, set_quant_state
from quant.percentile import STEM, quantize_resnet
from quant.qwt import CompensatedBlock, compensated_blocks
from quant.qwt_conv import CompensatedConvBlock
from quant.wrap import quantize_model
from utils.core.errors import UserError
from utils.core.files import write_atomic

FORMAT = 'repq-vit+qwt'
VERSION = 2
READABLE_VERSIONS = (1, 2)


def save_quantized(model, path, model_name, timm_name, w_bits, a_bits, meta=None):
    """Write ``model`` (after repq_vit, and qwt_compensate if it ran) to ``path`` atomically."""
    uninitialised = [name for name, q in quantizers(model) if not q.inited]
    if uninitialised:
        raise ValueError(f"cannot save a model with uncalibrated quantizers ({', '.join(uninitialised[:3])}): "
                         "run repq_vit first")
    payload = {
        'format': FORMAT, 'version': VERSION,
        'model': model_name, 'timm_name': timm_name, 'w_bits': int(w_bits), 'a_bits': int(a_bits),
        'compensated': bool(compensated_blocks(model)),
        'conv_input_bits': _conv_input_bits(model),
        'state_dict': {k: v.detach().cpu() for k, v in model.state_dict().items()},
        'meta': meta or {},
    }
    write_atomic(path, lambda tmp: torch.save(payload, tmp))


def _conv_input_bits(model):
    """A ResNet's input bits of the convolutions after the stem (8 as published; the opt-in changes them), so
    that loading rebuilds the same quantizers; None for other models."""
    if family_of(model) is not resnet:
        return None
    return next(m.input_quantizer.n_bits for n, m in model.named_modules() if isinstance(m, QuantConv2d) and n != STEM)


def read_saved(path, trust=False):
    """The payload of a file written by ``save_quantized``, or a UserError saying what it is not.
    ``trust``: allow arbitrary pickled objects (code can run while the file is read)."""
    if not os.path.isfile(path):
        raise UserError(f"--load {path} not found: pass a file written by --save")
    try:
        payload = load_tensors(path, trust)
    except UntrustedObjects as e:
        raise UserError(f"--load {path} holds Python objects other than tensors ({e.args[0]}), which are not "
                        "unpickled unless trusted: re-run --save to write it anew, or pass --trust_checkpoint "
                        "if you trust the file") from None
    except Exception as e:
        raise UserError(f"cannot read --load {path} ({type(e).__name__}): pass a file written by --save") from None
    if not (isinstance(payload, dict) and payload.get('format') == FORMAT):
        raise UserError(f"--load {path} is not a quantized model written by --save (plain weights go to --checkpoint)")
    if payload.get('version') not in READABLE_VERSIONS:
        raise UserError(f"--load {path} has format version {payload.get('version')}; this code reads versions "
                        f"{' and '.join(map(str, READABLE_VERSIONS))}: re-run --save with this code")
    if payload['version'] == 1:
        payload = _from_version_1(payload)
    return payload


def _from_version_1(payload):
    """A version-1 payload with its quantizer dict moved into the state dict (as buffers)."""
    state = dict(payload['state_dict'])
    for name, s in payload['quantizers'].items():  # its 'n_bits' are the file's w_bits / a_bits again
        state[f'{name}.delta'] = s['delta']
        state[f'{name}.inited'] = torch.tensor(True)
        if 'zero_point' in s:
            state[f'{name}.zero_point'] = s['zero_point']
            state[f'{name}.channel_wise'] = torch.tensor(bool(s['channel_wise']))
    rest = {k: v for k, v in payload.items() if k != 'quantizers'}
    return {**rest, 'state_dict': state}


def _expected_state(model, state):
    """``model.state_dict()`` plus the calibrated tensors the file gives its quantizers: their
    shape is taken from the file on loading."""
    expected = dict(model.state_dict())
    for name, q in quantizers(model):
        for attr in q.TENSORS:
            key = f'{name}.{attr}'
            if key in state:
                expected[key] = state[key]
    return expected


def load_quantized(path, device='cpu', payload=None, model=None, trust=False):
    """Rebuild the model saved at ``path``: timm class (random init, nothing downloaded), the SPEC §2
    quantized layers, the QwT blocks, then its state dict. ``model``: the float model to fill instead
    of building the saved timm name (prepared, e.g. a custom-size timm class). ``trust``: see
    ``read_saved``. Returns (model, payload)."""
    payload = payload or read_saved(path, trust)
    if model is None:
        model = build_model(payload['timm_name'], pretrained=False)
    is_resnet = family_of(model) is resnet
    if is_resnet:
        quantize_resnet(model, payload['w_bits'], payload['a_bits'], payload.get('conv_input_bits'))
    else:
        quantize_model(model, payload['w_bits'], payload['a_bits'])
    state = payload['state_dict']
    if payload['compensated']:
        block_class = CompensatedConvBlock if is_resnet else CompensatedBlock
        for slot in walk(model):
            if slot.kind == 'block':
                slot.replace(block_class(slot.module, torch.empty(0), torch.empty(0)))
    for name, m in model.named_modules():
        prefix = f'{name}.' if name else ''
        if isinstance(m, CompensatedBlock):  # W, b shapes come from the file (absent: reported below)
            for key in ('comp_weight', 'comp_bias'):
                setattr(m, key, nn.Parameter(torch.empty_like(state.get(prefix + key, torch.empty(0))),
                                             requires_grad=False))
        elif isinstance(m, QuantLinear) and m.bias is None and prefix + 'bias' in state:
            m.bias = nn.Parameter(torch.empty_like(state[prefix + 'bias']))  # reparameterisation added it
    problems = state_dict_mismatches(_expected_state(model, state), state)
    if problems:
        raise UserError(f"--load {path} does not fit {payload['timm_name']}: {'; '.join(problems)}")
    model.load_state_dict(state)
    incomplete = [name for name, q in quantizers(model)
                  if not q.inited or any(getattr(q, a) is None for a in q.TENSORS)]
    if incomplete:
        raise UserError(f"--load {path} has no calibrated parameters for quantizer {incomplete[0]}: the file is "
                        "incomplete; re-run --save")
    set_quant_state(model, weight_quant=True, act_quant=True)
    return model.to(device).eval(), payload
