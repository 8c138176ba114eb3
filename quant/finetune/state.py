"""The QwT* checkpoint: trainable parameters, optimizer, scaler, scheduler, position, generators, loss curve;
written atomically by rank 0, read by rank 0 and sent to every process."""
import os
import random

import numpy as np
import torch

from quant.finetune.config import RESUMABLE_CHANGES
from utils.core import distributed
from utils.core.errors import UserError, cause
from utils.core.files import write_atomic

FORMAT = 'qwtstar-checkpoint-1'


def rng_state():
    """This process's python, numpy and torch (CPU and CUDA) generator states, as plain types and tensors."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {'python': random.getstate(), 'numpy': [kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached],
            'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate(_tuples(state['python']))
    kind, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def _tuples(value):
    """random.setstate wants the nested tuples back (a saved state may come back with lists)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_checkpoint(path, state):
    """Rank 0 writes ``state`` (with every process's generator states, gathered) to ``path`` atomically."""
    state = dict(state, format=FORMAT, rng=distributed.all_gather_object(rng_state()))
    if distributed.rank() == 0:
        write_atomic(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path):
    """Rank 0's reading of ``path`` on every process: the saved state, or None where there is no file."""
    state = None
    if distributed.rank() == 0 and os.path.exists(path):
        try:
            state = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as exc:  # a file that is not a checkpoint: say which, never guess
            state = UserError(f"cannot read the QwT* checkpoint {path} ({cause(exc)}): delete it to start the "
                              "fine-tuning over")
        if isinstance(state, dict) and state.get('format') != FORMAT:
            state = UserError(f"{path} is not a QwT* checkpoint of this version (format "
                              f"{state.get('format')!r}): delete it to start the fine-tuning over")
    state = distributed.broadcast_object(state)
    if isinstance(state, UserError):
        raise state
    return state


def check_resumable(path, state, config_dict, world, names):
    """A UserError where the checkpoint holds another run than the one asked for."""
    saved = state['config']
    for key, value in config_dict.items():
        if key not in RESUMABLE_CHANGES and saved.get(key) != value:
            raise UserError(f"the QwT* checkpoint {path} was written with {key}={saved.get(key)!r}, this run has "
                            f"{key}={value!r}: rerun with the same flags to resume, or delete it to start over")
    if state['world_size'] != world:
        raise UserError(f"the QwT* checkpoint {path} was written by {state['world_size']} process(es), this run has "
                        f"{world}: resume with {state['world_size']}, or delete it to start over")
    if list(state['trainable']) != list(names):
        raise UserError(f"the QwT* checkpoint {path} trains other parameters than this model's: it belongs to "
                        "another model; delete it to start over")
