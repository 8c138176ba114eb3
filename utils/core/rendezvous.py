"""Forming the process group without a silent wait.

torch's env:// rendezvous blocks rank 0 until every process of WORLD_SIZE has joined, for 30 minutes by
default and without a word (a peer that never started, a wrong MASTER_ADDR on the others). Here the
rendezvous alone gets its own timeout (--dist_timeout), rank 0 says what it waits for while it waits, and a
timeout ends in one line naming the fix. The collectives of the run keep torch's default timeout: a long
stage on one rank must not break the others' wait."""
import os
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

from utils.core.environment import DIST_TIMEOUT_S
from utils.core.errors import UserError

FIRST_NOTICE_S = 5        # a rendezvous that works takes well under a second on one node
NOTICE_EVERY_S = 30


def where():
    """MASTER_ADDR:MASTER_PORT as the launcher set them."""
    return f"{os.environ.get('MASTER_ADDR', '(unset)')}:{os.environ.get('MASTER_PORT', '(unset)')}"


def waiting_line(backend, world_size, since, timeout_s):
    """Rank 0's notice while the other processes have not all joined."""
    return (f"waiting for all {world_size} processes (WORLD_SIZE) to join the {backend} process group at {where()} "
            f"since {time.strftime('%H:%M:%S', time.localtime(since))} (gives up after --dist_timeout "
            f"{timeout_s:g} s)")


def timeout_message(backend, world_size, rank, timeout_s, error):
    """The one-line error at the timeout: who did not meet, and how to start them so they do."""
    joined = str(error).partition('waiting for clients. ')[2].rstrip('.')
    seen = f' ({joined})' if joined else ''
    return (f"the {backend} process group did not form within --dist_timeout {timeout_s:g} s: RANK={rank} of "
            f"WORLD_SIZE={world_size} waited at MASTER_ADDR:MASTER_PORT={where()}{seen}. Start all {world_size} "
            "processes together with torchrun --nproc_per_node N (or python -m torch.distributed.launch), with the "
            "same MASTER_ADDR (rank 0's host, reachable from every node) and MASTER_PORT")


class _Notices:
    """A thread that prints ``line()`` on stderr after ``first`` seconds, then every ``every`` seconds,
    until the block ends."""

    def __init__(self, line, first=FIRST_NOTICE_S, every=NOTICE_EVERY_S, enabled=True):
        self.line, self.first, self.every, self.enabled = line, first, every, enabled
        self._done = threading.Event()

    def _loop(self):
        wait = self.first
        while not self._done.wait(wait):
            print(self.line(), file=sys.stderr, flush=True)
            wait = self.every

    def __enter__(self):
        if self.enabled:
            threading.Thread(target=self._loop, daemon=True, name='rendezvous-notices').start()
        return self

    def __exit__(self, *exc):
        self._done.set()


def init_process_group(backend, timeout_s=DIST_TIMEOUT_S, first=FIRST_NOTICE_S, every=NOTICE_EVERY_S, device_id=None):
    """dist.init_process_group(backend) over env:// (torchrun, torch.distributed.launch), the rendezvous
    bounded by ``timeout_s``; ``device_id``: this rank's GPU, for NCCL. Raises UserError at the timeout; other failures (no MASTER_ADDR, a port
    taken) propagate as torch raises them."""
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    since = time.time()
    try:
        first = min(first, timeout_s / 2)  # a short --dist_timeout still gets its notice first
        with _Notices(lambda: waiting_line(backend, world, since, timeout_s), first, every, enabled=rank == 0):
            store, rank, world = next(dist.rendezvous('env://', timeout=timedelta(seconds=timeout_s)))
    except dist.DistError as e:
        if time.time() - since < timeout_s:
            raise
        raise UserError(timeout_message(backend, world, rank, timeout_s, e)) from None
    store.set_timeout(default_pg_timeout)  # the store's later use: torch's default, as init_process_group sets it
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world,
                            **({} if device_id is None else {'device_id': device_id}))
