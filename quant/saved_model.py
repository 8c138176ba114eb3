"""``--save`` / ``--load``: a quantized (and compensated) model in one file, so that a finished
calibration is never redone. The file holds the reparameterised weights, every quantizer's delta and
zero point, the QwT W and b, the bit widths and the model name; loading rebuilds the same modules from
timm's class (no download) and gives the same logits."""
import os

import torch
from torch import nn

from models import build_model, state_dict_mismatches, walk
from quant.layers import QuantLinear, quantizers, set_quant_state
from quant.qwt import CompensatedBlock, compensated_blocks
from quant.quantizers import UniformQuantizer
from quant.wrap import quantize_model
from utils.errors import UserError
from utils.files import write_atomic

FORMAT = 'repq-vit+qwt'
VERSION = 1


def _quantizer_state(q):
    state = {'n_bits': q.n_bits, 'delta': q.delta.detach().cpu()}
    if isinstance(q, UniformQuantizer):
        state.update(channel_wise=q.channel_wise, zero_point=q.zero_point.detach().cpu())
    return state


def save_quantized(model, path, model_name, timm_name, w_bits, a_bits, meta=None):
    """Write ``model`` (after repq_vit, and qwt_compensate if it ran) to ``path`` atomically."""
    uninitialised = [name for name, q in quantizers(model) if not q.inited]
    if uninitialised:
        raise ValueError(f"cannot save a model with uncalibrated quantizers ({', '.join(uninitialised[:3])})")
    payload = {
        'format': FORMAT, 'version': VERSION,
        'model': model_name, 'timm_name': timm_name, 'w_bits': int(w_bits), 'a_bits': int(a_bits),
        'compensated': bool(compensated_blocks(model)),
        'state_dict': {k: v.detach().cpu() for k, v in model.state_dict().items()},
        'quantizers': {name: _quantizer_state(q) for name, q in quantizers(model)},
        'meta': meta or {},
    }
    write_atomic(path, lambda tmp: torch.save(payload, tmp))


def read_saved(path):
    """The payload of a file written by ``save_quantized``, or a UserError saying what it is not."""
    if not os.path.isfile(path):
        raise UserError(f"--load {path} not found: pass a file written by --save")
    try:
        payload = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read --load {path} ({type(e).__name__}): pass a file written by --save") from None
    if not (isinstance(payload, dict) and payload.get('format') == FORMAT):
        raise UserError(f"--load {path} is not a quantized model written by --save (plain weights go to --checkpoint)")
    if payload.get('version') != VERSION:
        raise UserError(f"--load {path} has format version {payload.get('version')}; this code reads version {VERSION}")
    return payload


def load_quantized(path, device='cpu', payload=None, model=None):
    """Rebuild the model saved at ``path``: timm class (random init, nothing downloaded), the SPEC §2
    quantized layers, the QwT blocks, then every tensor and quantizer parameter. ``model``: the float
    model to fill instead of building the saved timm name (prepared, e.g. a custom-size timm class).
    Returns (model, payload)."""
    payload = payload or read_saved(path)
    if model is None:
        model = build_model(payload['timm_name'], pretrained=False)
    quantize_model(model, payload['w_bits'], payload['a_bits'])
    state = payload['state_dict']
    if payload['compensated']:
        for slot in walk(model):
            if slot.kind == 'block':
                slot.replace(CompensatedBlock(slot.module, torch.empty(0), torch.empty(0)))
    for name, m in model.named_modules():
        prefix = f'{name}.' if name else ''
        if isinstance(m, CompensatedBlock):  # W, b shapes come from the file (absent: reported below)
            for key in ('comp_weight', 'comp_bias'):
                setattr(m, key, nn.Parameter(torch.empty_like(state.get(prefix + key, torch.empty(0))),
                                             requires_grad=False))
        elif isinstance(m, QuantLinear) and m.bias is None and prefix + 'bias' in state:
            m.bias = nn.Parameter(torch.empty_like(state[prefix + 'bias']))  # reparameterisation added it
    problems = state_dict_mismatches(model.state_dict(), state)
    if problems:
        raise UserError(f"--load {path} does not fit {payload['timm_name']}: {'; '.join(problems)}")
    model.load_state_dict(state)
    saved_q = payload['quantizers']
    for name, q in quantizers(model):
        if name not in saved_q:
            raise UserError(f"--load {path} has no parameters for quantizer {name}: the file is incomplete")
        s = saved_q[name]
        q.n_bits, q.delta, q.inited = s['n_bits'], s['delta'].to(device), True
        if isinstance(q, UniformQuantizer):
            q.channel_wise, q.zero_point = s['channel_wise'], s['zero_point'].to(device)
    set_quant_state(model, weight_quant=True, act_quant=True)
    return model.to(device).eval(), payload
