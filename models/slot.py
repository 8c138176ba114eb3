"""Model-agnostic access to the sequence QwT walks: blocks to compensate and PatchMerging layers."""
from dataclasses import dataclass
from typing import Union

from torch import nn


@dataclass
class Slot:
    """One place in the model: ``parent[key]`` (a block list and index) or ``parent.key`` (an attribute)."""
    parent: nn.Module
    key: Union[int, str]
    kind: str  # 'block' (compensated) or 'merge' (Swin PatchMerging: run, not compensated)

    @property
    def module(self):
        return self.parent[self.key] if isinstance(self.key, int) else getattr(self.parent, self.key)

    def replace(self, module):
        if isinstance(self.key, int):
            self.parent[self.key] = module
        else:
            setattr(self.parent, self.key, module)
