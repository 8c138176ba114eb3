"""utils/core/progress.py: a bar on a terminal; in a file, a few whole lines (start, each tenth or minute, end)."""
import io

from utils.core import progress as progress_module
from utils.core.progress import PlainProgress, progress_bar


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_in_a_file_progress_is_whole_lines_at_each_tenth_and_the_end():
    out, clock = io.StringIO(), Clock()
    bar = PlainProgress(range(20), 'QwT images', None, 'batch', True, out, clock=clock)
    for _ in bar:
        clock.t += 0.5
    lines = out.getvalue().splitlines()
    assert lines[0] == 'QwT images: 0/20 batch (0 %), started'
    assert lines[1] == 'QwT images: 2/20 batch (10 %), 0.5 s'  # counted as handed out
    assert lines[9] == 'QwT images: 18/20 batch (90 %), 8.5 s'
    assert lines[10] == 'QwT images: 20/20 batch (100 %), 10.0 s, done'
    assert len(lines) == 11 and '\r' not in out.getvalue()


def test_a_loop_that_breaks_early_still_ends_with_a_line():
    out = io.StringIO()
    for i in PlainProgress(range(100), 'QwT images', 4, 'batch', True, out, clock=Clock()):
        if i == 3:
            break
    assert out.getvalue().splitlines()[-1] == 'QwT images: 4/4 batch (100 %), 0.0 s, done'


def test_a_minute_without_a_tenth_gives_a_line_and_updates_of_several_count(monkeypatch):
    out, clock = io.StringIO(), Clock()
    bar = PlainProgress(None, 'eval', 1000, 'it', True, out, clock=clock)
    clock.t += progress_module.PLAIN_EVERY_S
    bar.update(1)
    bar.update(299)  # crosses 10 %, 20 % and 30 % at once: one line
    bar.close()
    bar.close()
    assert out.getvalue().splitlines() == ['eval: 0/1000 it (0 %), started', 'eval: 1/1000 it (0 %), 60.0 s',
                                           'eval: 300/1000 it (30 %), 60.0 s', 'eval: 300/1000 it (30 %), 60.0 s, done']


def test_other_ranks_print_nothing_and_a_terminal_gets_a_tqdm_bar():
    out = io.StringIO()
    for _ in progress_bar(range(3), 'x', enabled=False, file=out):
        pass
    assert out.getvalue() == ''

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    from tqdm import tqdm
    bar = progress_bar(range(3), 'x', file=Terminal())
    assert isinstance(bar, tqdm)
    bar.close()
    assert isinstance(progress_bar(range(3), 'x', file=io.StringIO()), PlainProgress)
