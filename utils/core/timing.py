"""Wall-clock seconds per named stage, synchronising the GPU so asynchronous kernels are counted."""
import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class Stopwatch:
    """``with watch('stage'): ...`` adds the block's seconds to ``watch.seconds['stage']``."""

    def __init__(self, device, stages=()):
        self.device = torch.device(device)
        self.seconds = defaultdict(float, {s: 0.0 for s in stages})

    def _sync(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, stage):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[stage] += time.perf_counter() - start

    def rounded(self, digits=3):
        return {k: round(v, digits) for k, v in self.seconds.items()}
