"""Where QwT's full-precision target for a block comes from (SPEC §3, §6): the project's quantized block
with its quantizers switched off (the published way), or the matching block of a separate full-precision
model, which lets QwT follow any quantizer that keeps the model's block structure."""
import torch

from models import family_of, stem, walk
from quant.layers import set_quant_state
from utils.core.errors import UserError, cause

FIX = 'pass the full-precision model that q_model was quantized from (its blocks correspond one to one)'


def switch_pair(block):
    """x -> (full-precision, quantized) outputs of one project block: its quantizers off, then on."""
    def pair(x):
        set_quant_state(block, False, False)
        fp = block(x)
        set_quant_state(block, True, True)
        return fp, block(x)
    return pair


def model_pair(fp_block, q_block):
    """x -> (``fp_block(x)``, ``q_block(x)``): the target from a separate full-precision block."""
    def pair(x):
        fp = fp_block(x)
        if fp is x:  # an identity block: the fits subtract in place, never into the features
            fp = fp.clone()
        return fp, q_block(x)
    return pair


def _family(model, role):
    try:
        return family_of(model)
    except TypeError as e:
        raise UserError(f"{role} is a {type(model).__name__}, not a timm VisionTransformer, SwinTransformer or "
                        f"ResNet: {FIX}") from e


def _steps(slots):
    """A readable name for each walk step: 'block 3' (counted as the QwT log counts) or 'PatchMerging after
    block 1'."""
    names, block = [], 0
    for s in slots:
        names.append(f'block {block}' if s.kind == 'block' else f'PatchMerging after block {block - 1}')
        block += s.kind == 'block'
    return names


def _shape(t):
    return list(t.shape) if torch.is_tensor(t) else type(t).__name__


@torch.no_grad()
def check_fp_model(q_model, fp_model, first_images):
    """UserError (one line, the first mismatch and the fix) unless ``fp_model``'s blocks correspond to
    ``q_model``'s: the same family, the same walk (blocks and Swin PatchMerging layers), and on the first
    batch ``first_images`` every block gives the shape of q_model's block on the same input (q_model's
    stem, then q_model's outputs). Changes nothing in either model."""
    q_family, fp_family = _family(q_model, 'q_model'), _family(fp_model, 'fp_model')
    if q_family is not fp_family:
        raise UserError(f"fp_model is a {type(fp_model).__name__} but q_model a {type(q_model).__name__}: {FIX}")
    q_device, fp_device = next(q_model.parameters()).device, next(fp_model.parameters()).device
    if q_device != fp_device:
        raise UserError(f"fp_model is on {fp_device} but q_model on {q_device}: move it with "
                        f"fp_model.to('{q_device}')")
    q_slots, fp_slots = walk(q_model), walk(fp_model)
    q_blocks, fp_blocks = (sum(s.kind == 'block' for s in slots) for slots in (q_slots, fp_slots))
    if q_blocks != fp_blocks:
        raise UserError(f"fp_model has {fp_blocks} blocks but q_model has {q_blocks}: {FIX}")
    q_names, fp_names = _steps(q_slots), _steps(fp_slots)
    for q_name, fp_name in zip(q_names, fp_names):
        if q_name != fp_name:
            raise UserError(f"fp_model's walk has {fp_name} where q_model's has {q_name} (stages of other "
                            f"depths): {FIX}")
    if len(q_slots) != len(fp_slots):
        raise UserError(f"fp_model has {len(fp_slots) - fp_blocks} PatchMerging layers but q_model has "
                        f"{len(q_slots) - q_blocks}: {FIX}")
    x = stem(q_model, first_images.to(q_device))
    for name, q_slot, fp_slot in zip(q_names, q_slots, fp_slots):
        q_out = q_slot.module(x)
        try:
            fp_out = fp_slot.module(x)
        except Exception as e:  # a block of another width cannot even take the input
            raise UserError(f"fp_model's {name} fails on q_model's input of shape {_shape(x)} ({cause(e)}): "
                            f"{FIX}") from e
        if _shape(fp_out) != _shape(q_out):
            raise UserError(f"fp_model's {name} gives shape {_shape(fp_out)} where q_model's gives {_shape(q_out)} "
                            f"on the first batch: {FIX}")
        x = q_out
