"""Progress of the table while cells run: the lines every backend prints as cells start and end, the
counts, and the estimate of the time left from the cells already finished."""
import time

from utils.run.naming import FAMILY_METHODS


def _duration(seconds):
    if seconds is None:
        return ''
    seconds = int(round(seconds))
    if seconds < 60:
        return f'{seconds}s'
    if seconds < 3600:
        return f'{seconds // 60}m{seconds % 60:02d}s'
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'


def estimate(remaining, running, timed, n_slots, now=None):
    """(seconds left, rough) from the wall times of finished cells ``timed`` [(cell, seconds)], or None
    before any cell has finished. A cell costs the mean of the finished cells of its model and kind; else
    that of its kind, scaled by how much longer its model's FP cell took than theirs (the FP cell of each
    model runs first); else that of its kind; else that of all cells, and then the figure is only a rough
    lower bound (rough True). The sum is spread over the slots, and the result is never below the longest
    remaining cell."""
    if not timed:
        return None
    now = time.monotonic() if now is None else now

    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    def of(model=None, kind=None):
        return mean([s for c, s in timed if model in (None, c.model) and kind in (None, c.kind)])

    overall, rough = of(), False

    def guess(cell):
        nonlocal rough
        g = of(cell.model, cell.kind)
        if g is not None:
            return g
        peers = list(dict.fromkeys(c.model for c, _ in timed if c.kind == cell.kind))
        fp_self, fp_peers = of(cell.model, 'fp'), mean([of(m, 'fp') for m in peers])
        if peers and fp_self and fp_peers:
            return of(kind=cell.kind) * fp_self / fp_peers
        g = of(kind=cell.kind)
        if g is None:
            rough = True
            return overall
        return g

    costs = [guess(c) for c in remaining] + [max(0.0, guess(j.cell) - (now - j.start)) for j in running]
    return max(sum(costs) / max(1, n_slots), max(costs, default=0.0)), rough


def _eta_text(est):
    if est is None:
        return ''
    seconds, rough = est
    return f", {'at least ' if rough else 'about '}{_duration(seconds)} left"


def _stamp(at=None, now=None):
    """The time of a progress line: HH:MM:SS of ``at`` (time.time(); default now), with the date when it is
    not today's (a job followed long after it started)."""
    now = time.time() if now is None else now
    at = now if at is None else at
    same_day = time.localtime(at)[:3] == time.localtime(now)[:3]
    return time.strftime('%H:%M:%S' if same_day else '%Y-%m-%d %H:%M:%S', time.localtime(at))


class Reporter:
    """Progress lines, with the time of day (of ``at``, time.time(), where the event happened earlier)."""

    def __init__(self, out):
        self.out = out

    def __call__(self, text, at=None):
        print(f"[{_stamp(at)}] {text}", file=self.out, flush=True)


def _accuracy_text(cell, r):
    if cell.kind == 'fp':
        return f"FP top-1 {r['fp_top1']:.2f}"
    method = getattr(cell, 'method', None) or FAMILY_METHODS.get(cell.family, 'RepQ-ViT')
    ptq = r.get('ptq_top1', r.get('repq_top1'))  # a result.json written before --ptq: repq_top1
    return f"{method} {ptq:.2f}, + QwT {r['qwt_top1']:.2f}"


class Cancelled(str):
    """Why a cell ended without a result when --cancel stopped it: said as cancelled, not as a failure."""


class Progress:
    """The start and end lines of the cells of one command, with the counts so far and the time left.
    ``timed``: [(cell, wall seconds)] of the cells finished before (extended here); ``running`` (passed to
    ``ended``): objects with ``.cell`` and ``.start`` (time.monotonic() of their start)."""

    def __init__(self, report, total, done, timed, n_slots):
        self.report, self.total, self.done, self.timed, self.n_slots = report, total, done, timed, n_slots
        self.outcome = {}   # cell: (ok, result dict or why it failed)

    def started(self, cell, where, at=None):
        """One cell started, at ``at`` (time.time()) when that was before now (a SLURM job found running)."""
        self.report(f'start {cell.label} on {where}', at=at)

    def ended(self, cell, ok, detail, wall, returncode, pending, running, log_path):
        """One cell ended: ``detail`` is its result dict, or why it failed (``log_path`` holds its output)."""
        self.outcome[cell] = (ok, detail)
        if ok:
            self.done += 1
            self.timed.append((cell, wall))
        failed = sum(not o and not isinstance(d, Cancelled) for o, d in self.outcome.values())
        cancelled = sum(isinstance(d, Cancelled) for _, d in self.outcome.values())
        counts = (f'{self.done}/{self.total} done, {failed} failed, ' + (f'{cancelled} cancelled, ' if cancelled else '')
                  + f'{len(running)} running')
        eta = _eta_text(estimate(pending, running, self.timed, self.n_slots)) if pending or running else ''
        if ok:
            self.report(f'done {cell.label} in {_duration(wall)}: {_accuracy_text(cell, detail)} | {counts}{eta}')
        elif isinstance(detail, Cancelled):
            self.report(f'cancelled {cell.label} after {_duration(wall)}: {detail} | {counts}{eta}')
        else:
            self.report(f'FAILED {cell.label} (exit {returncode}) after {_duration(wall)}: {detail} '
                        f'[{log_path}] | {counts}{eta}')
