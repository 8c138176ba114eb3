"""timm 0.4.12's attention modules with both matrix products as modules of their own (SPEC §1), so
RepQ-ViT can quantize their operands. Built from an existing timm module, sharing its parameters:
the state-dict keys and the arithmetic are timm's."""
from typing import Optional

import torch
from torch import nn


class MatMul(nn.Module):
    def forward(self, a, b):
        return a @ b


def _share(new, old, names):
    for name in names:
        setattr(new, name, getattr(old, name))
    new.matmul1 = MatMul()
    new.matmul2 = MatMul()


class Attention(nn.Module):
    """timm ``vision_transformer.Attention`` with ``matmul1(q, k^T)`` and ``matmul2(attn, v)``."""

    def __init__(self, attn):
        super().__init__()
        _share(self, attn, ('num_heads', 'scale', 'qkv', 'attn_drop', 'proj', 'proj_drop'))

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = self.matmul1(q, k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = self.matmul2(attn, v).transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        return self.proj_drop(x)


class WindowAttention(nn.Module):
    """timm ``swin_transformer.WindowAttention``: q is scaled first, the relative position bias and
    the shift mask are added after ``matmul1``."""

    def __init__(self, attn):
        super().__init__()
        self.register_buffer('relative_position_index', attn.relative_position_index)
        _share(self, attn, ('dim', 'window_size', 'num_heads', 'scale', 'relative_position_bias_table', 'qkv',
                            'attn_drop', 'proj', 'proj_drop', 'softmax'))

    def forward(self, x, mask: Optional[torch.Tensor] = None):
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * self.scale
        attn = self.matmul1(q, k.transpose(-2, -1))
        window_area = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(window_area, window_area, -1)
        attn = attn + bias.permute(2, 0, 1).contiguous().unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(B_ // nW, nW, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.softmax(attn)
        attn = self.attn_drop(attn)
        x = self.matmul2(attn, v).transpose(1, 2).reshape(B_, N, C)
        x = self.proj(x)
        return self.proj_drop(x)
