"""Top-1 / top-5 counting over the val split, several model variants per decoded batch."""
import torch
from utils.core.progress import progress_bar

from utils.core import distributed


def topk_correct(logits, target, ks=(1, 5)):
    """Number of samples whose target is among the k largest logits, for each k (a tensor, on the
    logits' device, so counting never waits for the accelerator)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top.eq(target[:, None])
    return torch.stack([hit[:, :k].any(dim=1).sum() for k in ks])


@torch.no_grad()
def evaluate(variants, loader, device, progress=False, on_batch=None):
    """Run every ``variants[name](images) -> logits`` on each batch ``(images, targets, ...)``, decoded
    once; ``on_batch(batch)`` sees every batch first.

    Returns {name: {'top1': %, 'top5': %, 'correct1', 'correct5', 'count'}} with counts summed
    over all processes.
    """
    counts = torch.zeros(len(variants), 3, dtype=torch.float64, device=device)
    for batch in progress_bar(loader, desc='eval', unit='batch', enabled=progress):
        if on_batch is not None:
            on_batch(batch)
        images, target = batch[0], batch[1]
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        for i, fn in enumerate(variants.values()):
            counts[i, :2] += topk_correct(fn(images), target).to(counts.dtype)
            counts[i, 2] += target.shape[0]
    distributed.all_reduce_sum(counts)
    out = {}
    for (name, _), (c1, c5, n) in zip(variants.items(), counts.tolist()):
        out[name] = {'top1': 100.0 * c1 / max(n, 1), 'top5': 100.0 * c5 / max(n, 1),
                     'correct1': int(c1), 'correct5': int(c5), 'count': int(n)}
    return out
