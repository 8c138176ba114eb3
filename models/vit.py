"""How QwT walks a ViT / DeiT: the stem up to the first block, then ``model.blocks`` in order."""
import torch

from models.slot import Slot


def stem(model, x):
    """Input of the first block: patch embedding, class (and distillation) token, position embedding."""
    x = model.patch_embed(x)
    tokens = [model.cls_token.expand(x.shape[0], -1, -1)]
    if model.dist_token is not None:
        tokens.append(model.dist_token.expand(x.shape[0], -1, -1))
    x = torch.cat((*tokens, x), dim=1)
    return model.pos_drop(x + model.pos_embed)


def walk(model):
    for i in range(len(model.blocks)):
        yield Slot(model.blocks, i, 'block')
