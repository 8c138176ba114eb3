"""The QwT* checkpoint: trainable parameters, optimizer, scaler, scheduler, position (step), loss curve;
written atomically by rank 0, read by rank 0 and sent to every process."""
import io
import os

import torch

from quant.finetune.config import RESUMABLE_CHANGES
from utils.core import distributed
from utils.core.errors import UserError, cause
from utils.core.files import write_atomic

FORMAT = 'qwtstar-checkpoint-1'


def _from_bytes(data):
    return torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)


def save_checkpoint(path, state):
    """Rank 0 writes ``state`` to ``path`` atomically. No generator states: every random draw of the run is
    keyed by (seed, epoch, position or step), and the global generators are never drawn from."""
    if distributed.rank() == 0:
        state = dict(state, format=FORMAT)
        write_atomic(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path):
    """Rank 0's reading of ``path`` on every process: the saved state, or None where there is no file."""
    data, error = None, None
    if distributed.rank() == 0 and os.path.exists(path):
        with open(path, 'rb') as f:
            data = f.read()
        try:
            state = _from_bytes(data)
        except Exception as exc:  # a file that is not a checkpoint: say which, never guess
            state, error = None, (f"cannot read the QwT* checkpoint {path} ({cause(exc)}): delete it to start the "
                                  "fine-tuning over")
        if error is None and not (isinstance(state, dict) and state.get('format') == FORMAT):
            error = f"{path} is not a QwT* checkpoint of this version: delete it to start the fine-tuning over"
    data, error = distributed.broadcast_object((data, error))  # bytes: object collectives fail on tensors here
    if error is not None:
        raise UserError(error)
    return None if data is None else _from_bytes(data)


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
