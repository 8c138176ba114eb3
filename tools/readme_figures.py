"""The README's demo table and the figures it quotes, from real runs of the demos.

    python tools/readme_figures.py            # run every demo, rewrite README.md's marked blocks
    python tools/readme_figures.py --check    # run them, exit 1 naming every block that differs

Each demo of ``DEMOS`` runs once as a user runs it (``python SCRIPT --demo``, one process); ``EXTRA`` runs
back the README's sentences about other settings (two processes included). The blocks between
``<!-- readme_figures:NAME -->`` and ``<!-- /readme_figures:NAME -->`` are replaced; nothing else in README.md
is touched. The demo pins its CPU threads and kernels (utils.core.cpu_numerics), so the figures hold on any
x86-64 CPU and core count (tests/test_readme_demo.py reruns the demos and holds them). A time cannot be the
same on every machine: the table states a bound on each demo's CPU time (TIME_MARGIN over the one measured
here, rounded up to TIME_STEP_S), which the test holds.
"""
import argparse
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
README = os.path.join(ROOT, 'README.md')


@dataclass(frozen=True)
class Demo:
    """One run: ``python SCRIPT --demo`` (plus ``flags``; under torchrun with ``procs`` > 1), named ``key``."""
    key: str
    script: str
    flags: tuple = field(default=())
    procs: int = 1

    @property
    def command(self):
        launcher = ['python'] if self.procs == 1 else ['torchrun', '--nproc_per_node', str(self.procs)]
        return ' '.join([*launcher, self.script, '--demo', *self.flags])

    def argv(self, out_dir):
        launcher = [sys.executable] if self.procs == 1 else [
            sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(self.procs)]
        return [*launcher, os.path.join(ROOT, self.script), '--demo', *self.flags, '--output_dir', out_dir]


# A new demo is one entry here (its row, its figures and the test follow). QwT* (issue 28): each demo also
# fine-tunes W, b and the head for two epochs of the training digits (the QwT* column; one epoch with the pinned
# CPU kernels leaves the ViT's QwT* at its QwT figure). Fine-tuning runs after QwT
# and its evaluation is the same val pass, so the other columns are exactly those of the plain --demo
# (tests/test_finetune_run.py holds that). The ResNet's published 8-bit conv inputs leave QwT at its FP top-1,
# with nothing for QwT* to add: its row reads real 3-bit inputs (--conv_a_bits a_bits --a_bits 3), where QwT
# leaves some; the plain ResNet demo (W2/A8 in effect) is the ResNet section's sentence.
FINETUNE = ('--finetune_epochs', '2')
RESNET_PLAIN = Demo('resnet_plain', 'qwt_resnet.py')
DEMOS = (Demo('vit', 'qwt_vit_and_deit.py', FINETUNE), Demo('swin', 'qwt_swin.py', FINETUNE),
         Demo('resnet', 'qwt_resnet.py', ('--conv_a_bits', 'a_bits', '--a_bits', '3', *FINETUNE)))
# Runs behind the README's sentences on other settings (written by this tool; the test reruns TESTED_EXTRA).
EXTRA = (Demo('vit_w3a3', 'qwt_vit_and_deit.py', ('--w_bits', '3', '--a_bits', '3')),
         Demo('swin_lstsq', 'qwt_swin.py', ('--qwt_solver', 'lstsq')),
         RESNET_PLAIN,
         Demo('vit_2proc', 'qwt_vit_and_deit.py', procs=2))
TESTED_EXTRA = ('vit_2proc',)
# 'quantized': RepQ-ViT for the ViT and the Swin, Percentile for the ResNet (the README says so above the table)
TABLE_HEADER = ('| command | model | bits | FP | quantized | + QwT | + QwT* | CPU time |',
                '|---|---|---|---|---|---|---|---|')
TIME_MARGIN, TIME_STEP_S = 1.5, 10


def run_demo(demo, out_dir, env=None):
    """Run ``demo`` in fresh processes: (its result.json, CPU seconds of its processes and their loader
    workers, its stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(demo.argv(out_dir), cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, **(env or {})})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f'{demo.command} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}')
    with open(os.path.join(out_dir, 'result.json')) as f:
        return json.load(f), cpu, proc.stdout


def time_bound(cpu_seconds):
    """The bound the README states for a run measured at ``cpu_seconds``."""
    return int(math.ceil(cpu_seconds * TIME_MARGIN / TIME_STEP_S) * TIME_STEP_S)


def bits(r):
    """What runs: Percentile's ResNet convolutions read 8 bits unless --conv_a_bits a_bits (SPEC §3b); another
    --ptq method reads --a_bits."""
    a = 8 if r.get('conv_a_bits') == '8' and r.get('ptq', 'percentile') == 'percentile' else r['a_bits']
    return f"W{r['w_bits']}/A{a}"


def table_row(demo, r, bound=None):
    """The demo's table row; ``bound`` (seconds) None leaves the time cell empty (for comparisons); the QwT*
    cell is empty for a run that did not fine-tune."""
    time_cell = '' if bound is None else f'< {bound} s'
    star = '' if r.get('qwtstar_top1') is None else f"{r['qwtstar_top1']:.2f}"
    return (f"| `{demo.command}` | `{r['model']}` | {bits(r)} | {r['fp_top1']:.2f} | "
            f"{r['ptq_top1']:.2f} | {r['qwt_top1']:.2f} | {star} | {time_cell} |")


def row_bound(row):
    """The seconds of a row's time cell ('< 40 s'), or None."""
    m = re.search(r'\|\s*<\s*(\d+) s\s*\|\s*$', row)
    return m and int(m.group(1))


def without_time(row):
    """A table row with its last (time) cell emptied."""
    cells = row.rstrip().rstrip('|').split('|')
    return '|'.join(cells[:-1]) + '|  |'


def _join(words):
    return words[0] if len(words) == 1 else ', '.join(words[:-1]) + ' and ' + words[-1]


def pin_text():
    from utils.core.cpu_numerics import OTHER_ARCH_EXAMPLE, PIN
    return (f"one CPU thread and the CPU kernels every x86-64 CPU runs ({', '.join(f'`{n}={v}`' for n, v in PIN[:3])}"
            f", set before torch loads; utils/core/cpu_numerics.py): the same figures on any x86-64 CPU, AVX512, AVX2 "
            f"or older (another architecture, {OTHER_ARCH_EXAMPLE} say, rounds differently and can differ)")


def figures_text(results):
    """The sentences under the table, from the demo runs (``results``: [(demo, result)] in table order)."""
    lost = _join([f"{r['fp_top1'] - r['ptq_top1']:.2f} (`{r['model']}`)" for _, r in results])
    back = _join([f"{r['qwt_top1'] - r['ptq_top1']:.2f}" for _, r in results])
    size = _join([f"{r['qwt_size_mb'] - r['ptq_size_mb']:.2f}" for _, r in results])
    images = _join(sorted({str(r['num_qwt']) for _, r in results}))
    torch_version = results[0][1]['versions']['torch'].split('+')[0]
    return (f"Measured with `python tools/readme_figures.py` (torch {torch_version}; the demo runs on {pin_text()}; "
            f"`tests/test_readme_demo.py` reruns the demos and holds these rows against them). CPU time: the seconds "
            f"of the run's processes and loader workers (one thread: about the wall time on an idle machine), "
            f"measured on this repository's 2-core CPU and stated as a bound {TIME_MARGIN:g}x that, which the test "
            f"holds. At these bits quantization loses {lost} points of top-1 against full precision, and QwT's "
            f"per-block linear correction, fitted in closed form on {images} images, gives back {back} of them for "
            f"{size} MB of fp16 weights.")


def extra_text(extra):
    """The sentences on other settings, from ``extra`` ({key: result} of DEMOS and EXTRA)."""
    v, s = extra['vit_w3a3'], extra['swin_lstsq']
    gain, lstsq = v['qwt_top1'] - v['ptq_top1'], s['qwt_top1'] - extra['swin']['qwt_top1']
    effect = f"QwT gives back {gain:.2f} points" if gain > 0 else 'QwT does not help'
    return (f"At W3/A3 the ViT loses less ({v['fp_top1'] - v['ptq_top1']:.2f} points) and {effect}: FP "
            f"{v['fp_top1']:.2f}, RepQ-ViT {v['ptq_top1']:.2f}, RepQ-ViT + QwT {v['qwt_top1']:.2f} "
            "(`python qwt_vit_and_deit.py --demo --w_bits 3 --a_bits 3`). Swin's first block is left out (one warning "
            "line says why: its first stage is rank-deficient, so the published float32 inverse cannot fit it). "
            f"`--qwt_solver lstsq` fits that block, but on this demo it {'raises' if lstsq > 0 else 'lowers'} "
            f"RepQ-ViT + QwT top-1 from {extra['swin']['qwt_top1']:.2f} to {s['qwt_top1']:.2f} "
            "(`python qwt_swin.py --demo --qwt_solver lstsq`).")


def resnet_text(extra):
    """The ResNet section's demo sentence: the plain demo (8-bit conv inputs as published) and the demo table's
    ResNet row (real low-bit conv inputs)."""
    r, low = extra['resnet_plain'], extra['resnet']
    return (f"Demo: `python qwt_resnet.py --demo` runs `resnet_digits` (timm's ResNet, two stages, trained on the UCI "
            f"digits like the other demo models; `models/digits/README.md`) at {bits(r)} (`--w_bits {r['w_bits']} "
            f"--a_bits {r['a_bits']}`, but the conv inputs are 8-bit as published, so W{r['w_bits']}/A8 is what runs) "
            f"with `--factor {r['factor']}` (2 groups per QwT convolution), `--eval all`: FP {r['fp_top1']:.2f}, "
            f"Percentile {r['ptq_top1']:.2f}, Percentile + QwT {r['qwt_top1']:.2f} on the 500 held-out digits. The "
            f"demo table's ResNet row reads real {low['a_bits']}-bit conv inputs (`--conv_a_bits a_bits --a_bits "
            f"{low['a_bits']}`, in its own output folder): FP {low['fp_top1']:.2f}, Percentile {low['ptq_top1']:.2f}, "
            f"Percentile + QwT {low['qwt_top1']:.2f}, where QwT leaves room for QwT*. `--demo --model resnet18` is the "
            "random-weight full-size run.")


def two_process_text(one, two):
    """The sentence on two processes, from the one-process and the two-process ViT demo."""
    calib = len(set(one['calib_files']) & set(two['calib_files']))
    qwt = len(set(one['qwt_files']) & set(two['qwt_files']))
    return (f"Another number of processes draws other images (see \"Which images\", several processes): measured with "
            f"`python qwt_vit_and_deit.py --demo`, two processes (`torchrun --nproc_per_node 2 qwt_vit_and_deit.py "
            f"--demo`) share {calib} of the {len(one['calib_files'])} calibration files and {qwt} of the "
            f"{len(one['qwt_files'])} QwT files with one process, and give RepQ-ViT {two['ptq_top1']:.2f} / + QwT "
            f"{two['qwt_top1']:.2f} instead of {one['ptq_top1']:.2f} / {one['qwt_top1']:.2f}.")


# Every --ptq method on each demo it applies to ('Other quantizers: --ptq' in the README): the default methods'
# rows are the DEMOS' runs, the others one run each, at the demo's own bits.
def ptq_demos():
    """[(--ptq name, Demo)] of the README's method table, in registry order; the default method's Demo is the
    plain demo of DEMOS (its own flags)."""
    from utils.run import ptq
    family = {'qwt_vit_and_deit.py': 'vit', 'qwt_swin.py': 'swin', 'qwt_resnet.py': 'resnet'}
    out = []
    for name, method in ptq.METHODS.items():
        for d in DEMOS:
            f = family[d.script]
            if f in method.families:
                out.append((name, default_demo(d) if name == ptq.DEFAULTS[f] else
                            Demo(f'{d.key}_{name}', d.script, ('--ptq', name))))
    return out


def default_demo(d):
    """The run behind the default method's row of a demo: the demo itself (its PTQ and QwT columns are the plain
    --demo's), but the plain ResNet demo, not the table's real low-bit-input row."""
    return RESNET_PLAIN if d.script == 'qwt_resnet.py' else d


PTQ_HEADER = ('| `--ptq` | method | command | model | bits | FP | PTQ | PTQ + QwT | QwT gives back |',
              '|---|---|---|---|---|---|---|---|---|')


def ptq_row(name, demo, r):
    """One row of the method table, from the run's result.json ``r``."""
    return (f"| `{name}` | {r['method']} | `{demo.command}` | `{r['model']}` | {bits(r)} | "
            f"{r['fp_top1']:.2f} | {r['ptq_top1']:.2f} | {r['qwt_top1']:.2f} | {r['qwt_top1'] - r['ptq_top1']:+.2f} |")


def ptq_table(results):
    """The README's method table: ``results`` {demo key: result} of every Demo of ptq_demos()."""
    return '\n'.join([*PTQ_HEADER, *(ptq_row(n, d, results[d.key]) for n, d in ptq_demos())])


def ptq_rows(block):
    """The table rows of the README's method block."""
    return [ln for ln in block.splitlines()[2:] if ln.startswith('|')]


def blocks(runs, extra):
    """{block name: text} of the README from ``runs`` ([(demo, result, cpu seconds)]) and ``extra``."""
    table = '\n'.join([*TABLE_HEADER, *(table_row(d, r, time_bound(c)) for d, r, c in runs)])
    return {'demo_table': table, 'demo_figures': figures_text([(d, r) for d, r, _ in runs]),
            'demo_extra': extra_text(extra), 'resnet_demo': resnet_text(extra),
            'two_process': two_process_text(extra['vit'], extra['vit_2proc']),
            # the --ptq table where its brevitas runs were made (the tool makes them; tests/test_ptq_demos.py too)
            **({'ptq_table': ptq_table(extra)} if all(d.key in extra for _, d in ptq_demos()) else {})}


def block(name, text):
    return f'<!-- readme_figures:{name} -->\n{text}\n<!-- /readme_figures:{name} -->'


def read_block(readme, name):
    """The text between the markers of block ``name``, or None."""
    m = re.search(rf'<!-- readme_figures:{name} -->\n(.*?)<!-- /readme_figures:{name} -->', readme, re.S)
    return m and m.group(1).rstrip('\n')


def replace_block(readme, name, text):
    pattern = re.compile(rf'<!-- readme_figures:{name} -->\n.*?<!-- /readme_figures:{name} -->', re.S)
    if not pattern.search(readme):
        raise SystemExit(f'error: README.md has no block <!-- readme_figures:{name} -->: add the two markers')
    return pattern.sub(lambda _: block(name, text), readme)


def check(readme, runs, extra):
    """What differs between README.md and the runs: every block (the table's time cells aside), and every
    run's CPU time against the bound its row states. [] when it holds."""
    new, problems = blocks(runs, extra), []
    for name, text in new.items():
        old = read_block(readme, name)
        if name == 'demo_table' and old is not None:
            for (demo, _, cpu), a, b in zip(runs, old.splitlines()[2:], text.splitlines()[2:]):
                if without_time(a) != without_time(b):
                    problems.append(f'README: {a}\nrun:    {b}')
                elif row_bound(a) is None or cpu > row_bound(a):
                    problems.append(f'{demo.command}: {cpu:.1f} s of CPU time, over the README\'s bound ({a})')
            if len(old.splitlines()) != len(text.splitlines()):
                problems.append('README.md\'s demo table has other rows than DEMOS')
        elif old != text:
            problems.append(f'README block {name}:\n  README: {old}\n  run:    {text}')
    return problems


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--check', action='store_true', help='compare with README.md instead of rewriting it')
    p.add_argument('--runs', default=None, metavar='JSON',
                   help='keep the runs (result.json and CPU time of each) in this file; if it exists, use them '
                        'instead of running the demos again')
    args = p.parse_args(argv)
    measured = {}
    if args.runs and os.path.exists(args.runs):
        measured = json.load(open(args.runs))
    with tempfile.TemporaryDirectory(prefix='readme_figures_') as tmp:
        other = [d for _, d in ptq_demos() if d not in DEMOS]
        for demo in (*DEMOS, *EXTRA, *other):
            if demo.key in measured:
                continue
            print(f'running {demo.command} ...', file=sys.stderr, flush=True)
            r, cpu, _ = run_demo(demo, os.path.join(tmp, demo.key))
            print(f'  {bits(r)} {r["fp_top1"]} {r["ptq_top1"]} {r["qwt_top1"]}, {cpu:.1f} s CPU', file=sys.stderr)
            measured[demo.key] = {'result': r, 'cpu_s': cpu}
            if args.runs:
                with open(args.runs, 'w') as f:
                    json.dump(measured, f)
    runs = [(d, measured[d.key]['result'], measured[d.key]['cpu_s']) for d in DEMOS]
    extra = {key: m['result'] for key, m in measured.items()}
    readme = open(README).read()
    if args.check:
        problems = check(readme, runs, extra)
        print('\n'.join(problems) or 'README.md holds the figures of these runs')
        sys.exit(1 if problems else 0)
    for name, text in blocks(runs, extra).items():
        readme = replace_block(readme, name, text)
    with open(README, 'w') as f:
        f.write(readme)
    print(blocks(runs, extra)['demo_table'])


if __name__ == '__main__':
    main()
