"""The run's log: console on every process (warnings only off rank 0), OUTPUT_DIR/log.txt on rank 0.
Console lines go through tqdm, so a log line never lands on the line of a progress bar."""
import logging
import sys

from utils.core.errors import UserError

LOGGERS = ('qwt', 'quant')


class TqdmHandler(logging.StreamHandler):
    """A console handler that clears the progress bars, writes the line, and redraws them."""

    def emit(self, record):
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # as logging.StreamHandler does: a broken console must not end the run
            self.handleError(record)


class MarkedFormatter(logging.Formatter):
    """``HH:MM:SS message`` for INFO; a warning or error says so (``HH:MM:SS WARNING: message``), so that it
    stands out among the run's lines."""

    def __init__(self):
        super().__init__('%(asctime)s %(message)s', '%H:%M:%S')

    def formatMessage(self, record):
        text = super().formatMessage(record)
        if record.levelno < logging.WARNING:
            return text
        stamp, _, message = text.partition(' ')
        return f'{stamp} {record.levelname}: {message}'


class WarningCount(logging.Handler):
    """Counts the run's warnings (and errors) for the end-of-run summary."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record):
        self.count += 1


def warning_count():
    """Warnings logged since setup_logging (0 if the log is not set up)."""
    return sum(h.count for h in logging.getLogger(LOGGERS[0]).handlers if isinstance(h, WarningCount))


def setup_logging(output_dir, is_main):
    """Console on every process (warnings only off rank 0); rank 0 also appends to OUTPUT_DIR/log.txt,
    so the log of an earlier run in the same folder is kept."""
    import os
    level = logging.INFO if is_main else logging.WARNING
    fmt = MarkedFormatter()
    handlers = [TqdmHandler(sys.stdout)]
    if is_main:
        try:
            os.makedirs(output_dir, exist_ok=True)
            handlers.append(logging.FileHandler(os.path.join(output_dir, 'log.txt'), mode='a'))
        except OSError as e:
            raise UserError(f"cannot write to --output_dir {output_dir} ({e.strerror or e}): choose a writable "
                            "folder") from None
    teardown_logging()
    for h in handlers:
        h.setFormatter(fmt)
    handlers.append(WarningCount())  # one counter shared by every logger
    for name in LOGGERS:
        log = logging.getLogger(name)
        for h in handlers:
            log.addHandler(h)
        log.setLevel(level)
        log.propagate = False


def teardown_logging():
    """Close the log file and give the loggers back their default state (the entry point may run
    in-process, e.g. under pytest)."""
    for name in LOGGERS:
        log = logging.getLogger(name)
        for h in list(log.handlers):
            log.removeHandler(h)
            h.close()
        log.setLevel(logging.NOTSET)
        log.propagate = True


def log_to_file(message):
    """Append ``message`` to log.txt only (it is already on the console), if the log is open."""
    log = logging.getLogger('qwt')
    for h in log.handlers:
        if isinstance(h, logging.FileHandler):
            h.emit(log.makeRecord(log.name, logging.INFO, __file__, 0, message, None, None))  # it says error: itself
