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
        except BaseException as e:
            try:  # the stage an error left, for a message that names it (set on the way out: outermost wins)
                e.qwt_stage = stage
            except AttributeError:  # an exception type without a __dict__
                pass
            self.seconds[stage] += time.perf_counter() - start  # no sync: the device may be what failed
            raise
        self._sync()
        self.seconds[stage] += time.perf_counter() - start

    def rounded(self, digits=3):
        return {k: round(v, digits) for k, v in self.seconds.items()}
