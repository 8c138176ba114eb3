"""The README results table: the published FP / PTQ / PTQ + QwT top-1 (paper_results.csv: RepQ-ViT on
ViT/DeiT/Swin; paper_results_resnet.csv: Percentile on ResNet) next to this project's result.json files, as
Markdown and CSV.

Runs enter the table by their configuration, never by file order:

- a run is one seed of a row; a row is a model, a bit width and a *variant*: the settings that make a
  run not comparable with the published procedure (random weights, a val subset, --demo, another QwT
  solver or accumulation, --start_block, another number of calibration or QwT images). The published
  procedure has no variant; runs of another variant get rows of their own, with the variant in the note.
- each row shows mean ± sample standard deviation over its seeds (n), and the difference of the mean
  from the paper;
- two runs of one row and seed: the newer (result.json modification time) is kept, with a warning
  naming both;
- ``--eval fp`` runs give the FP column of every row of their model (and data variant);
- a run of another PTQ method than the paper's (``--ptq brevitas-*``) gets rows of its own, named in the
  method column and the note, without paper figures;
- result.json files written before --ptq existed (``repq_*`` keys, no ``ptq`` field) read as the family's
  default method (load_results);
- demo, random-weight, val-subset, class-subset (--allow_class_subset) and ``--eval none`` runs are left out
  unless ``include`` names them.
"""
import csv
import io
import json
import math
import os
import statistics

from utils.core.errors import UserError

PAPER_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'paper_results.csv')
PAPER_RESNET_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'paper_results_resnet.csv')
# QwT* (issue 28): the paper's fine-tuned figures, merged into the rows of the same model and bits
PAPER_QWTSTAR_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'paper_results_qwtstar.csv')
PAPER_CSVS = (PAPER_CSV, PAPER_RESNET_CSV, PAPER_QWTSTAR_CSV)
QWTSTAR_COLUMNS = {'model': 'model', 'timm_name': 'timm_name', 'fp_top1': 'fp_top1', 'bits': 'bits',
                   'repq_vit_top1': 'ptq_top1', 'repq_vit_qwt_top1': 'qwt_top1', 'qwtstar_top1': 'qwtstar_top1',
                   'method': 'ptq_method'}
PAPER_COLUMNS = ('model', 'timm_name', 'fp_top1', 'bits', 'repq_vit_top1', 'repq_vit_qwt_top1')
# The published ResNet rows (SPEC §3b): their own columns, read into PAPER_COLUMNS (the timm name is the model's).
RESNET_COLUMNS = {'model': 'model', 'timm_name': 'model', 'fp_top1': 'fp_top1', 'bits': 'bits',
                  'repq_vit_top1': 'percentile_top1', 'repq_vit_qwt_top1': 'percentile_qwt_top1'}
# The post-training quantizer of a row: RepQ-ViT unless the paper row or the result.json says otherwise.
DEFAULT_METHOD = 'RepQ-ViT'
# The methods of the paper's rows, with their --ptq names: a result file without a 'ptq' field is one of these.
PAPER_METHODS = {'RepQ-ViT': 'repq', 'Percentile': 'percentile'}
# result.json keys before --ptq: the PTQ figures were written under repq_* (ResNet's Percentile too).
OLD_KEYS = {'ptq_top1': 'repq_top1', 'ptq_top5': 'repq_top5', 'ptq_size_mb': 'repq_size_mb'}
REQUIRED = ('timm_name', 'w_bits', 'a_bits')
DISPLAY = {'resnet18': 'ResNet-18', 'resnet50': 'ResNet-50', 'resnet101': 'ResNet-101', 'deit_tiny': 'DeiT-T', 'deit_small': 'DeiT-S', 'deit_base': 'DeiT-B',
           'deit_tiny_distilled': 'DeiT-T-distilled', 'deit_small_distilled': 'DeiT-S-distilled',
           'deit_base_distilled': 'DeiT-B-distilled', 'vit_small': 'ViT-S', 'vit_base': 'ViT-B',
           'swin_tiny': 'Swin-T', 'swin_small': 'Swin-S'}
# Runs not comparable with the paper, left out unless included by name. 'classes': a folder with another
# number of classes than the model (--allow_class_subset), scored on folder-index labels.
CATEGORIES = ('demo', 'random', 'subset', 'classes', 'eval-none')
ALL = frozenset(CATEGORIES)
PUBLISHED_QWTSTAR_EPOCHS = 1  # the paper's QwT*: one epoch of ImageNet training
PUBLISHED = {'qwt_solver': 'inverse', 'qwt_accumulate': 'concat', 'start_block': 0, 'num_calib': 32,
             'num_qwt': 512, 'kernel_size': 1, 'factor': 64, 'conv_a_bits': '8'}  # the last three: ResNet only
FIELDS = ('model', 'timm_name', 'bits', 'paper_fp', 'fp', 'paper_repq', 'paper_qwt', 'repq', 'repq_std', 'repq_n',
          'qwt', 'qwt_std', 'qwt_n', 'delta_fp', 'delta_repq', 'delta_qwt', 'n', 'seeds', 'note')
FIELDS = (*FIELDS, 'method', 'paper_qwtstar', 'qwtstar', 'qwtstar_std', 'qwtstar_n', 'delta_qwtstar')


def header(method='RepQ-ViT', with_method=False, qwtstar=False):
    """The Markdown header; ``method`` names the PTQ columns ('PTQ' for a table of several methods, which
    then has a method column); ``qwtstar``: with the QwT* columns (the paper's, this project's, the delta)."""
    m = method
    star = lambda *cols: cols if qwtstar else ()  # noqa: E731
    return ('model', 'bits', *(('method',) if with_method else ()), 'FP (paper)', 'FP (this project)', f'{m} (paper)',
            f'{m} + QwT (paper)', *star(f'{m} + QwT* (paper)'), f'{m} (this project)', f'{m} + QwT (this project)',
            *star(f'{m} + QwT* (this project)'), 'Δ FP', f'Δ {m}', 'Δ QwT', *star('Δ QwT*'), 'n', 'note')


HEADER = header()


def load_paper(path=PAPER_CSVS):
    """The published table(s), one dict per row in file order (``path``: one CSV or several, in order),
    accuracies as floats; ``repq_vit_top1`` / ``repq_vit_qwt_top1`` hold the row's PTQ method's figures and
    'method' names it (RepQ-ViT, or Percentile for the ResNet CSV)."""
    if not isinstance(path, str):
        rows = []
        for p in path:
            rows = _merge_qwtstar(rows, load_paper(p))
        return rows
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or ()
        resnet = all(c in fields for c in RESNET_COLUMNS.values()) and 'repq_vit_top1' not in fields
        qwtstar = all(c in fields for c in QWTSTAR_COLUMNS.values()) and 'repq_vit_top1' not in fields
        missing = [c for c in PAPER_COLUMNS if c not in fields]
        if missing and not resnet and not qwtstar:
            raise UserError(f"{path}: missing column(s) {', '.join(missing)} (expected {','.join(PAPER_COLUMNS)}, "
                            f"or {','.join(dict.fromkeys(RESNET_COLUMNS.values()))} for ResNet rows)")
        rows = list(reader)
    if resnet:
        rows = [{**{k: row[v] for k, v in RESNET_COLUMNS.items()}, 'method': 'Percentile'} for row in rows]
    if qwtstar:
        rows = [{k: row[v] for k, v in QWTSTAR_COLUMNS.items()} for row in rows]
    for line, row in enumerate(rows, start=2):
        try:
            for k in ('fp_top1', 'repq_vit_top1', 'repq_vit_qwt_top1', *(('qwtstar_top1',) if qwtstar else ())):
                row[k] = float(row[k])
        except (TypeError, ValueError):
            raise UserError(f'{path} line {line}: {k} is {row[k]!r}, expected a number') from None
    return rows


def _merge_qwtstar(rows, new):
    """``rows`` then ``new``, where a row of ``new`` with a QwT* figure for a model and bits already in ``rows``
    adds that figure to it (the QwT* summary repeats the FP, PTQ and QwT figures) instead of a row of its own."""
    index = {(r['timm_name'], r['bits']): r for r in rows}
    out = list(rows)
    for r in new:
        old = index.get((r['timm_name'], r['bits']))
        if old is not None and r.get('qwtstar_top1') is not None:
            old['qwtstar_top1'] = r['qwtstar_top1']
        else:
            out.append(r)
    return out


def find_results(paths):
    """result.json files named by ``paths`` (files, or folders searched recursively), each once."""
    files, seen = [], set()
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(d, 'result.json') for d, _, names in os.walk(p) if 'result.json' in names)
            if not found:
                raise UserError(f'no result.json under {p} (give a run output_dir or a result.json file)')
        elif os.path.isfile(p):
            found = [p]
        else:
            raise UserError(f'{p} does not exist (give a run output_dir or a result.json file)')
        for f in found:
            if os.path.abspath(f) not in seen:
                seen.add(os.path.abspath(f))
                files.append(f)
    return files


def load_results(files):
    """Parse each result.json into a dict (plus 'path': the file, 'mtime': its modification time),
    checking the keys the table needs."""
    out = []
    for path in files:
        try:
            with open(path) as f:
                r = json.load(f)
            mtime = os.stat(path).st_mtime_ns
        except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
            raise UserError(f'{path}: not a readable result.json ({e})') from None
        if not isinstance(r, dict):
            raise UserError(f'{path}: expected a JSON object, got {type(r).__name__}')
        missing = [k for k in REQUIRED if k not in r]
        if missing:
            raise UserError(f"{path}: missing key(s) {', '.join(missing)} (not a result.json of this project?)")
        for k in ('w_bits', 'a_bits'):
            if not isinstance(r[k], int) or isinstance(r[k], bool):
                raise UserError(f'{path}: {k} is {r[k]!r}, expected an integer')
        r = upgrade(r)
        for k in ('fp_top1', 'ptq_top1', 'qwt_top1', 'qwtstar_top1'):
            if r.get(k) is not None and not isinstance(r[k], (int, float)):
                raise UserError(f'{path}: {k} is {r[k]!r}, expected a number or null')
        out.append(dict(r, path=path, mtime=mtime))
    return out


def upgrade(r):
    """A result.json dict in today's form: a file written before --ptq has its PTQ figures under ``repq_*``
    and no ``ptq`` field (its method is its 'method', else RepQ-ViT): they move to ``ptq_*`` and ``ptq``."""
    r = dict(r)
    for new, old in OLD_KEYS.items():
        if new not in r and old in r:
            r[new] = r.pop(old)
    r['method'] = method_of(r)
    if not r.get('ptq'):
        r['ptq'] = PAPER_METHODS.get(r['method'])
    return r


def parse_include(text):
    """``--include`` value: comma-separated categories, or 'all'."""
    names = {n.strip() for n in text.split(',') if n.strip()}
    if 'all' in names:
        return ALL
    unknown = sorted(names - ALL)
    if unknown:
        raise UserError(f"--include {text}: unknown {', '.join(unknown)} (use {', '.join(CATEGORIES)} or all)")
    return frozenset(names)


# ---- what a run is ---------------------------------------------------------------------------------

def is_fp(r):
    """An ``--eval fp`` run: it measures the full-precision model, whatever its w_bits / a_bits say."""
    return r.get('eval') == 'fp'


def categories(r):
    """The categories of ``CATEGORIES`` that ``r`` falls in."""
    out = []
    if r.get('demo'):
        out.append('demo')
    if 'random' in (r.get('weights'), r.get('source_weights')):  # source_weights: what a --load file was made from
        out.append('random')
    if r.get('num_val') is not None and r.get('val_total') is not None and r['num_val'] < r['val_total']:
        out.append('subset')
    if class_subset(r):
        out.append('classes')
    if r.get('eval') == 'none' or all(r.get(k) is None for k in ('fp_top1', 'ptq_top1', 'qwt_top1', 'qwtstar_top1')):
        out.append('eval-none')
    return out


def class_subset(r):
    """Whether the run's folders hold another number of classes than its model (--allow_class_subset)."""
    model = r.get('model_classes')
    return model is not None and any(r.get(k) not in (None, model) for k in ('num_classes', 'train_classes'))


def data_variant(r):
    """What makes the run's data or weights differ from the published setting (also for FP runs)."""
    labels = []
    if 'random' in (r.get('weights'), r.get('source_weights')):
        labels.append('random weights')
    if 'subset' in categories(r):
        labels.append(f"val subset {r['num_val']}/{r['val_total']}")
    if class_subset(r):
        labels.append(f"{r.get('num_classes')}/{r['model_classes']} classes")
    if r.get('demo'):
        labels.append('demo')
    return tuple(labels)


def method_variant(r):
    """The quantization settings of the run that differ from the published procedure: another PTQ method
    than the paper's first."""
    labels = [] if method_of(r) in PAPER_METHODS else [method_of(r)]
    for key in ('qwt_solver', 'qwt_accumulate', 'start_block', 'kernel_size', 'factor', 'conv_a_bits'):
        if r.get(key) is not None and r[key] != PUBLISHED[key]:
            labels.append(f'{key} {r[key]}')
    if r.get('num_calib') is not None and r['num_calib'] != PUBLISHED['num_calib']:
        labels.append(f"{r['num_calib']} calibration images")
    if r.get('num_qwt') is not None and r['num_qwt'] != PUBLISHED['num_qwt']:
        labels.append(f"{r['num_qwt']} QwT images")
    return tuple(labels) + qwtstar_variant(r)


def qwtstar_variant(r):
    """QwT* runs of another length than the paper's one full epoch (more epochs, or --finetune_images)."""
    recipe = (r.get('finetune') or {}).get('recipe') or {}
    labels = []
    if recipe.get('epochs') not in (None, PUBLISHED_QWTSTAR_EPOCHS):
        labels.append(f"QwT* {recipe['epochs']} epochs")
    if recipe.get('max_images') is not None:
        labels.append(f"QwT* {recipe['max_images']} images/epoch")
    return tuple(labels)


def method_of(r):
    """The PTQ method of a result.json or paper row where it does not say: the family's default (Percentile for a
    ResNet, else RepQ-ViT)."""
    return r.get('method') or ('Percentile' if str(r.get('timm_name', '')).startswith('resnet') else DEFAULT_METHOD)


def bits_label(r):
    return f"W{r['w_bits']}/A{r['a_bits']}"


def select(results, include=ALL):
    """(kept, left_out): the runs whose categories are all in ``include``, and [(run, categories)] of the rest."""
    kept, left_out = [], []
    for r in results:
        outside = [c for c in categories(r) if c not in include]
        (left_out.append((r, outside)) if outside else kept.append(r))
    return kept, left_out


def _left_out_warning(left_out):
    """One line; each run is counted once, under all its categories (``demo+random``), so the counts add up."""
    counts = {}
    for _, cats in left_out:
        counts['+'.join(cats)] = counts.get('+'.join(cats), 0) + 1
    names = ', '.join(r['path'] for r, _ in left_out[:3]) + (f' and {len(left_out) - 3} more' if len(left_out) > 3
                                                              else '')
    kinds = sorted({c for _, cats in left_out for c in cats})
    return (f"left out {len(left_out)} run(s) not comparable with the paper "
            f"({', '.join(f'{n} {c}' for c, n in sorted(counts.items()))}): {names}; "
            f"add them with --include {','.join(kinds)}")


def _newest(runs, key, label, warnings):
    """{key(r): r}, keeping the newest run (mtime, then input order) of each key, with a warning naming both."""
    out = {}
    for _, r in sorted(enumerate(runs), key=lambda e: (e[1].get('mtime') or 0, e[0])):
        k = key(r)
        if k in out:
            warnings.append(f"{label(r)}: kept {r.get('path')} (newer), left out {out[k].get('path')}")
        out[k] = r
    return out


# ---- rows ------------------------------------------------------------------------------------------

def mean_std(values):
    """(mean, sample standard deviation (n-1; None for n < 2), n) of the values that are not None."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None, 0
    std = statistics.stdev(vals) if len(vals) > 1 else None
    return math.fsum(vals) / len(vals), std, len(vals)


def _delta(ours, paper):
    """This project minus the paper, None when either is missing."""
    return None if ours is None or paper is None else round(ours - paper, 4)


def _round(v):
    return None if v is None else round(v, 4)


def _row(name, timm_name, bits, paper, paper_fp, runs, fp_run, notes, method=DEFAULT_METHOD):
    """One table row: ``paper`` the paper's row of the model and bits (or None), ``paper_fp`` its FP
    (the FP depends on the model only), ``runs`` {seed: result} of the row, ``fp_run`` the model's FP result
    or None; without one, the FP column is the mean FP of the row's --eval all runs, if any."""
    p = paper or {}
    own_fp = [r['fp_top1'] for r in runs.values() if r.get('fp_top1') is not None]  # --eval all measured it too
    fp = fp_run.get('fp_top1') if fp_run else _round(sum(own_fp) / len(own_fp)) if own_fp else None
    row = {'model': name, 'timm_name': timm_name, 'bits': bits, 'paper_fp': paper_fp,
           'fp': fp, 'paper_repq': p.get('repq_vit_top1'),
           'paper_qwt': p.get('repq_vit_qwt_top1'), 'paper_qwtstar': p.get('qwtstar_top1')}
    for col, key in (('repq', 'ptq_top1'), ('qwt', 'qwt_top1'), ('qwtstar', 'qwtstar_top1')):
        mean, std, n = mean_std(r.get(key) for r in runs.values())
        row.update({col: _round(mean), f'{col}_std': _round(std), f'{col}_n': n})
        row[f'delta_{col}'] = _delta(mean, row[f'paper_{col}'])
    row['delta_fp'] = _delta(row['fp'], row['paper_fp'])
    row['n'] = len(runs)
    row['seeds'] = ' '.join(str(s) for s in sorted(runs, key=lambda s: (s is None, s or 0)))
    skipped = {f for r in [*runs.values(), fp_run] if r for f in r.get('skipped_images') or ()}
    if skipped:
        notes = [*notes, f'{len(skipped)} unreadable image(s) skipped']
    row['note'] = '; '.join(notes)
    row['method'] = method
    return row


def _other_method(mvar, runs=None):
    """The label of a row's PTQ method where it is not the paper's (method_variant puts it first), else None."""
    from utils.run.ptq import METHODS
    labels = {m.label for m in METHODS.values()} | {method_of(r) for r in (runs or {}).values()}
    return next((m for m in mvar[:1] if m in labels and m not in PAPER_METHODS), None)


def _bits_key(bits):
    try:
        w, a = bits[1:].split('/A')
        return int(w), int(a)
    except ValueError:
        return 0, 0


def build_rows(paper, results, only_results=False, include=ALL, expected=None):
    """The table rows and warnings.

    Paper rows in paper order (only those with a run if ``only_results``), each followed by its variant
    rows, then the configurations the paper lacks, sorted by model and bits. ``include``: the
    categories of non-comparable runs to keep (all by default; tools/make_table.py keeps none unless
    asked). ``expected``: {(timm_name, bits): seeds}, {(timm_name, bits, method label): seeds} for another PTQ
    method than the paper's, and {(timm_name, 'FP'): ...} of runs that should exist (tools/reproduce.py's
    cells); their rows are shown, and absent seeds are noted as missing.
    Returns (rows, warnings): runs left out, and runs replaced by a newer one of the same row and seed."""
    expected = expected or {}
    kept, left_out = select([upgrade(r) for r in results], include)
    warnings = [_left_out_warning(left_out)] if left_out else []
    fps = _newest([r for r in kept if is_fp(r)], lambda r: (r['timm_name'], data_variant(r)),
                  lambda r: f"{r['timm_name']} FP{''.join(f' ({v})' for v in data_variant(r))}", warnings)
    quant = _newest([r for r in kept if not is_fp(r)],
                    lambda r: (r['timm_name'], bits_label(r), data_variant(r), method_variant(r), r.get('seed')),
                    lambda r: f"{r['timm_name']} {bits_label(r)} seed {r.get('seed')}"
                              f"{''.join(f' ({v})' for v in data_variant(r) + method_variant(r))}", warnings)
    groups = {}
    for (timm_name, bits, dvar, mvar, seed), r in quant.items():
        groups.setdefault((timm_name, bits, dvar, mvar), {})[seed] = r
    paper_rows = {(p['timm_name'], p['bits']): p for p in paper}
    by_model = {}
    for p in paper:
        by_model.setdefault(p['timm_name'], []).append(p)
    keys = set(groups)
    if not only_results:
        keys |= {(t, b, (), ()) for t, b in paper_rows}
    for t, b, *method in expected:  # (timm_name, bits[, another method's label])
        if b != 'FP' and not any(k[:2] == (t, b) and _other_method(k[3]) == (method or [None])[0] for k in keys):
            keys.add((t, b, (), tuple(method)))
    for t, dvar in fps:  # an FP run with no quantized row of its model and data: the model's paper rows, or
        if not any(k[0] == t and k[2] == dvar for k in keys):  # for a variant no cell ran, one row of its own
            keys |= {(t, p['bits'], dvar, ()) for p in by_model.get(t, []) if not dvar} or {(t, '', dvar, ())}
    names = {r['timm_name']: r.get('model') for r in kept}

    def display(timm_name):
        short = by_model[timm_name][0]['model'] if timm_name in by_model else names.get(timm_name) or timm_name
        return DISPLAY.get(short, short)

    order = {k: i for i, k in enumerate(paper_rows)}

    def sort_key(k):
        t, b, dvar, mvar = k
        where = (0, order[(t, b)], '', (0, 0)) if (t, b) in order else (1, 0, display(t), _bits_key(b))
        return where + (bool(dvar), bool(mvar), dvar, mvar)

    rows = []
    for k in sorted(keys, key=sort_key):
        t, b, dvar, mvar = k
        runs = groups.get(k, {})
        notes = list(dvar + mvar)
        other = _other_method(mvar, runs)
        want = expected.get((t, b, other) if other else (t, b))
        if want is not None:
            missing = [s for s in want if s not in runs]
            if missing:
                notes.append(f"missing: seed{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))}")
        fp_run = fps.get((t, dvar))
        if fp_run is None and (t, 'FP') in expected:
            notes.append('missing: FP')
        paper_fp = by_model[t][0]['fp_top1'] if t in by_model else None
        method = other or (method_of(by_model[t][0]) if t in by_model else
                           method_of(next(iter(runs.values()), fp_run or {})))
        paper = None if other else paper_rows.get((t, b))  # the paper has no figures of another method
        rows.append(_row(display(t), t, b, paper, paper_fp, runs, fp_run, notes, method))
    return rows, warnings


# ---- output ----------------------------------------------------------------------------------------

def _fmt(v, spec):
    """A number as ``spec``, empty for None."""
    return '' if v is None else format(v, spec)


def _stat(row, col):
    """'mean ± std' (std only for n > 1), '(n=k)' where fewer seeds have this column than the row."""
    if not row[f'{col}_n']:
        return ''
    text = f'{row[col]:.2f}' + ('' if row[f'{col}_std'] is None else f" ± {row[f'{col}_std']:.2f}")
    return text + ('' if row[f'{col}_n'] == row['n'] else f" (n={row[f'{col}_n']})")


def table_method(rows):
    """(the name of the PTQ columns, whether a method column is needed): the rows' one method, or 'PTQ' and
    a method column where they have several."""
    methods = list(dict.fromkeys(r.get('method') or DEFAULT_METHOD for r in rows)) or [DEFAULT_METHOD]
    return (methods[0], False) if len(methods) == 1 else ('PTQ', True)


def has_qwtstar(rows):
    """Whether any row has a QwT* run: the table then shows the QwT* columns (the paper's figure beside)."""
    return any(r.get('qwtstar_n') for r in rows)


def to_markdown(rows):
    """The table in Markdown: paper figures with one decimal as published, ours with two (mean ± sample
    std over seeds), signed deltas of the mean. The PTQ columns carry the rows' method (RepQ-ViT,
    Percentile), or 'PTQ' with a method column for a table of both. Where a run fine-tuned (QwT*), the
    paper's QwT* figure, ours and their delta stand beside the QwT columns."""
    method, with_method = table_method(rows)
    star = has_qwtstar(rows)
    head = header(method, with_method, star)
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        s = (lambda *cells: cells) if star else (lambda *cells: ())  # noqa: E731
        cells = [r['model'], r['bits'], *((r.get('method') or DEFAULT_METHOD,) if with_method else ()),
                 _fmt(r['paper_fp'], '.1f'), _fmt(r['fp'], '.2f'), _fmt(r['paper_repq'], '.1f'),
                 _fmt(r['paper_qwt'], '.1f'), *s(_fmt(r.get('paper_qwtstar'), '.1f')), _stat(r, 'repq'), _stat(r, 'qwt'),
                 *s(_stat(r, 'qwtstar')), _fmt(r['delta_fp'], '+.2f'), _fmt(r['delta_repq'], '+.2f'),
                 _fmt(r['delta_qwt'], '+.2f'), *s(_fmt(r.get('delta_qwtstar'), '+.2f')), str(r['n'] or ''), r['note']]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def to_csv(rows):
    """The rows as CSV with the field names as header, numbers unrounded, empty for None."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator='\n')
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
