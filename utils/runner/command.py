"""The whole table in one command (tools/reproduce.py): every cell (model x bits x seed, plus one
full-precision evaluation per model) as a normal run of the family's entry script in a folder of its
own, resumable, then the table and its figures. The plan and the records are utils.runner.cells; the
cells run through a backend (utils.runner.local: child processes on this node's GPUs or CPU slots).
Imports neither torch nor timm unless GPUs must be counted or checkpoint file names looked up.
"""
import os
import shlex
import signal
import sys

from utils.core.errors import UserError
from utils.runner.cells import cell_state, plan
from utils.runner.flags import _unique, build_parser, slurm_options, split_argv
from utils.runner.local import LocalBackend
from utils.runner.cells import Cancelled
from utils.runner.progress import Progress, Reporter, _eta_text, estimate
from utils.table import figures
from utils.table import results as table
from utils.table.write import write_table


def write_cells_table(cells, launch, output_dir, out):
    """results_table.{md,csv,png} of the done cells, and r2.png of each done quantized cell; the
    expected cells that are not done are marked missing. Returns the Markdown."""
    done = [c for c in cells if cell_state(c, launch)[0] == 'done']
    results = table.load_results([c.result_path for c in done])
    expected = {}
    for c in cells:
        key = (c.timm_name, 'FP') if c.kind == 'fp' else (c.timm_name, c.bits, *filter(None, [c.other_method]))
        expected.setdefault(key, []).append(c.seed)
    rows, warnings = table.build_rows(table.load_paper(), results, only_results=True, include=table.ALL,
                                      expected=expected)
    for w in warnings:
        print(f'warning: {w}', file=out)
    quantized = [r for c, r in zip(done, results) if c.kind == 'quant']
    md, written, _ = write_table(rows, os.path.join(output_dir, 'results_table'), quantized, keep_fresh_r2=True)
    if len(written) > 2:
        written.append('r2.png in each quantized cell')
    print(md, end='', file=out)
    print(f"wrote {', '.join(written)}", file=out)
    if not figures.have_matplotlib():
        print(figures.NO_MATPLOTLIB, file=out)
    return md


def print_plan(cells, launch, states, args, extra, timed, out, backend):
    quant = [c for c in cells if c.kind == 'quant']
    models = _unique(c.model for c in cells)
    print(f"plan: {len(models)} model(s) x {len(_unique(c.bits for c in quant))} bit width(s) x "
          f"{len(_unique(c.seed for c in quant))} seed(s) = {len(quant)} quantized cell(s), plus "
          f"{len(cells) - len(quant)} FP cell(s), in {os.path.abspath(args.output_dir)}", file=out)
    print(f"on {launch.describe()}{'; flags for every run: ' + shlex.join(extra) if extra else ''}", file=out)
    width = max(len(c.model) for c in cells)
    for c in cells:
        state, detail, _ = states[c]
        detail = 'no checkpoint' if state == 'blocked' else detail
        where = '' if c.kind == 'fp' else f'seed {c.seed}'
        sep = ' ' if state == 'done' else ': '
        print(f"  {c.model:<{width}}  {c.bits:<6} {where:<8} {state}{sep + detail if detail else ''}", file=out)
    for reason in _unique(c.blocked for c in cells if c.blocked):
        print(f'  blocked: {reason}', file=out)
    counts = {s: sum(states[c][0] == s for c in cells) for s in ('done', 'to run', 'blocked', 'running')}
    todo = [c for c in cells if states[c][0] == 'to run']
    est = estimate(todo, [], timed, len(launch.slots))
    eta = (f'; estimate{_eta_text(est)[1:]}' if est else
           '; estimate: once a first cell has finished') if todo else ''
    running = f", {counts['running']} queued or running already" if counts['running'] else ''
    print(f"{len(cells)} cells: {counts['done']} done, {counts['to run']} to run, {counts['blocked']} blocked"
          f"{running}{eta}", file=out)
    if todo:
        print(f'first command: {backend.command_line(todo[0])}', file=out)


def make_backend(args, launch):
    """The backend of --backend, its flags checked (SLURM flags are refused without --backend slurm)."""
    options = slurm_options(args, launch)
    if args.backend == 'slurm':
        from utils.runner.slurm import SlurmBackend
        return SlurmBackend(launch, options, os.path.join(os.path.abspath(args.output_dir), 'slurm'),
                            wait=not args.no_wait)
    for flag in ('no_wait', 'cancel'):
        if getattr(args, flag):
            raise UserError(f'--{flag} is for --backend slurm')
    return LocalBackend(launch)


def main(argv=None, out=None):
    """tools/reproduce.py; returns the exit code."""
    out = out or sys.stdout
    own, extra = split_argv(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(own)
        cells, launch = plan(args, extra)
        backend = make_backend(args, launch)
        states = {c: cell_state(c, launch, backend.alive) for c in cells}
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('error: interrupted', file=sys.stderr)
        return 130
    timed = [(c, s[2]['wall_s']) for c, s in states.items() if s[0] == 'done' and s[2].get('wall_s')]
    print_plan(cells, launch, states, args, extra, timed, out, backend)
    if args.dry_run:
        return 0
    running = [(c, states[c][2]) for c in cells if states[c][0] == 'running']
    try:
        if args.cancel:
            print(backend.cancel(running), file=out)
            return 0
        backend.check_running(running)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    todo = [c for c in cells if states[c][0] == 'to run']
    code, outcome = run_todo(backend, todo, [c for c, _ in running], cells, states, timed, launch, out)
    if code is not None:
        return code
    write_cells_table(cells, launch, args.output_dir, out)
    return report_end(cells, states, outcome, out)


def run_todo(backend, todo, waiting, cells, states, timed, launch, out):
    """Run (or submit and follow) the cells: (None, their outcomes), or (exit code, None) where the command
    ends without the table (a submission refused: 2; Ctrl-C: 130; --no_wait: 0)."""
    done = sum(s[0] == 'done' for s in states.values())
    progress = Progress(Reporter(out), len(cells), done, timed, max(len(launch.slots), 1))
    previous = _terminate_as_interrupt()
    try:
        if not (todo or waiting):
            print('nothing to run: every cell that can run is done', file=out)
            return None, {}
        outcome = backend.run(todo, progress, waiting)
        return (None, outcome) if backend.wait else (0, None)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2, None
    except KeyboardInterrupt:
        print(backend.interrupted_line, file=out)
        return 130, None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def report_end(cells, states, outcome, out):
    """The failed and blocked cells, one line each; returns the exit code (0: every cell done)."""
    failed = [(c, d) for c, (ok, d) in outcome.items() if not ok and not isinstance(d, Cancelled)]
    cancelled = [(c, d) for c, (ok, d) in outcome.items() if isinstance(d, Cancelled)]
    blocked = [c for c in cells if states[c][0] == 'blocked']
    for c, detail in failed:
        print(f'failed: {c.label}: {detail} (see {c.console_path})', file=out)
    for c, detail in cancelled:
        print(f'cancelled: {c.label}: {detail}', file=out)
    for reason in _unique(c.blocked for c in blocked):
        print(f'not run ({sum(c.blocked == reason for c in blocked)} cells): {reason}', file=out)
    if failed or cancelled or blocked:
        print(f'{len(failed)} cell(s) failed, ' + (f'{len(cancelled)} cancelled, ' if cancelled else '')
              + f'{len(blocked)} not run; fix them and run the same command again', file=out)
        return 1
    return 0


def _terminate_as_interrupt():
    """SIGTERM (a batch system ending the job) stops the children like Ctrl-C; returns the old handler."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None
