"""How QwT walks a ResNet (SPEC §3b): the stem up to the first residual block, then every residual block
of layer1..layer4 in order, indexed across stages."""
import torch

from models.slot import Slot

STAGES = ('layer1', 'layer2', 'layer3', 'layer4')


def stem(model, x):
    """Input of the first block: conv1, bn1, ReLU, max pooling (the published ``forward_before_blocks``)."""
    return model.maxpool(model.act1(model.bn1(model.conv1(x))))


def walk(model):
    for stage in STAGES:
        layer = getattr(model, stage)
        for i in range(len(layer)):
            yield Slot(layer, i, 'block')


def block_channels(block):
    """(input channels, output channels) of a timm BasicBlock or Bottleneck, without running it."""
    last = block.conv3 if hasattr(block, 'conv3') else block.conv2
    return block.conv1.in_channels, last.out_channels


@torch.no_grad()
def randomize_batchnorms(model, seed=0):
    """Trained-like BatchNorm statistics and affine parameters for a random-weight ResNet: timm initialises
    the last BN of every residual branch with gamma = 0 (the branch is then zero and quantization changes
    nothing in it) and every running variance with 1. A generator of its own leaves the global one to the
    draws of SPEC §1b."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.5)
    return model
