"""Progress of a stage that takes more than a few seconds: a tqdm bar on a terminal; where the stream is a
file (log.txt's console copy, a cell's console.txt, a SLURM log), a few plain lines instead: the start, about
every 10 % or every minute, and the end. A bar's carriage-return updates in a file put log lines in the
middle of bar fragments."""
import sys
import time

PLAIN_EVERY_FRACTION = 0.1
PLAIN_EVERY_S = 60.0


def _is_terminal(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def progress_bar(iterable=None, desc='', total=None, unit='it', enabled=True, file=None):
    """A tqdm bar where ``file`` (default stderr) is a terminal, else a PlainProgress; both iterate over
    ``iterable`` and take ``update(n)`` and ``close()``. ``enabled`` False (other ranks) shows nothing."""
    file = sys.stderr if file is None else file
    if enabled and _is_terminal(file):
        from tqdm import tqdm
        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, file=file)
    return PlainProgress(iterable, desc, total, unit, enabled, file)


class PlainProgress:
    """Whole lines ``desc: n/total unit (p %), s``: at the first step, when the count crosses each tenth of
    ``total`` (or a minute has passed since the last line), and at the end."""

    def __init__(self, iterable, desc, total, unit, enabled, file, clock=time.monotonic):
        if total is None and iterable is not None and hasattr(iterable, '__len__'):
            total = len(iterable)
        self.iterable, self.desc, self.total, self.unit = iterable, desc, total, unit
        self.enabled, self.file, self.clock = enabled, file, clock
        self.n, self.closed = 0, False
        self.start = self.last = clock()
        self.next_mark = 0  # the tenths of total already crossed
        self._line(started=True)

    def _line(self, started=False, done=False):
        if not self.enabled:
            return
        of = f'/{self.total}' if self.total else ''
        pct = f' ({100 * self.n / self.total:.0f} %)' if self.total else ''
        when = 'started' if started else f'{self.clock() - self.start:.1f} s' + (', done' if done else '')
        print(f'{self.desc}: {self.n}{of} {self.unit}{pct}, {when}', file=self.file, flush=True)
        self.last = self.clock()

    def update(self, n=1):
        self.n += n
        tenths = min(int(self.n / (self.total * PLAIN_EVERY_FRACTION)), round(1 / PLAIN_EVERY_FRACTION)) \
            if self.total else 0
        crossed, self.next_mark = tenths > self.next_mark, max(self.next_mark, tenths)
        if (crossed and self.n < (self.total or 0)) or self.clock() - self.last >= PLAIN_EVERY_S:
            self._line()

    def __iter__(self):
        """Counts each item as it is handed out; the end line comes also when the loop breaks early."""
        try:
            for item in self.iterable:
                self.update(1)
                yield item
        finally:
            self.close()

    def close(self):
        if not self.closed:
            self.closed = True
            self._line(done=True)
