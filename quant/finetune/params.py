"""What QwT* trains (every compensation W, b and the classifier heads) and the freezing of everything else."""
from quant.layers import set_quant_state
from quant.quantizers import set_straight_through
from quant.qwt import CompensatedBlock, compensated_blocks
from utils.core.errors import UserError

HEAD_NAMES = ('head', 'head_dist', 'fc')  # ViT/DeiT/Swin head, distilled DeiT's second head, ResNet's fc


def trainable_parameters(model):
    """{qualified name: parameter} in ``model.named_parameters()`` order: every CompensatedBlock's comp_weight
    and comp_bias (fitted and zero ones alike) and the parameters of the top-level heads (HEAD_NAMES)."""
    comp = {id(m.comp_weight) for m in compensated_blocks(model)} | {id(m.comp_bias) for m in compensated_blocks(model)}
    heads = {id(p) for name, child in model.named_children() if name in HEAD_NAMES for p in child.parameters()}
    if not comp:
        raise UserError(f"QwT* fine-tunes the QwT compensation, and this {type(model).__name__} has none: fine-tune "
                        "after the QwT fit, or --load a model saved with its QwT compensation")
    if not heads:
        raise UserError(f"QwT* trains the classifier head, and this {type(model).__name__} has no "
                        f"{', '.join(HEAD_NAMES)} with parameters")
    return {name: p for name, p in model.named_parameters() if id(p) in comp or id(p) in heads}


def prepare_for_finetune(model):
    """Freeze all but ``trainable_parameters`` (requires_grad False), put the model in eval mode (BatchNorm
    statistics, LayerNorm, dropout and the distilled DeiT's averaged heads as at inference), switch weight and
    activation quantization on with the quantizers' straight-through gradients, then set only the CompensatedBlock wrappers' own ``training`` flag: their
    float32 training branch (not ``.train()``, which would reach the quantized block inside). Returns the
    trainable parameters."""
    trainable = trainable_parameters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable.values():
        p.requires_grad_(True)
    model.eval()
    set_quant_state(model, True, True)
    set_straight_through(model, True)
    for m in model.modules():
        if isinstance(m, CompensatedBlock):
            m.enabled = True
            m.training = True
    return trainable


def finish_finetune(model):
    """Back to inference: eval mode everywhere (the wrappers' half-precision branch), the quantizers' inference
    form, nothing requires grad."""
    set_straight_through(model, False)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model
