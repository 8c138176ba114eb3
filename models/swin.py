"""How QwT walks a Swin transformer: every block of every stage, then the stage's PatchMerging."""
from models.slot import Slot


def stem(model, x):
    """Input of the first block: patch embedding (with its norm), optional absolute position embedding."""
    x = model.patch_embed(x)
    if model.absolute_pos_embed is not None:
        x = x + model.absolute_pos_embed
    return model.pos_drop(x)


def walk(model):
    for layer in model.layers:
        for i in range(len(layer.blocks)):
            yield Slot(layer.blocks, i, 'block')
        if layer.downsample is not None:
            yield Slot(layer, 'downsample', 'merge')
