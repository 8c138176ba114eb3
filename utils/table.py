"""The README results table: the published RepQ-ViT / QwT top-1 (paper_results.csv) next to this
project's result.json files, as Markdown and CSV."""
import csv
import io
import json
import os

from utils.errors import UserError

PAPER_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'paper_results.csv')
PAPER_COLUMNS = ('model', 'timm_name', 'fp_top1', 'bits', 'repq_vit_top1', 'repq_vit_qwt_top1')
REQUIRED = ('timm_name', 'w_bits', 'a_bits')
DISPLAY = {'deit_tiny': 'DeiT-T', 'deit_small': 'DeiT-S', 'deit_base': 'DeiT-B',
           'deit_tiny_distilled': 'DeiT-T-distilled', 'deit_small_distilled': 'DeiT-S-distilled',
           'deit_base_distilled': 'DeiT-B-distilled', 'vit_small': 'ViT-S', 'vit_base': 'ViT-B',
           'swin_tiny': 'Swin-T', 'swin_small': 'Swin-S'}
FIELDS = ('model', 'fp_top1', 'bits', 'paper_repq', 'paper_qwt', 'repq', 'qwt', 'delta_repq', 'delta_qwt', 'note')
HEADER = ('model', 'FP', 'bits', 'RepQ-ViT (paper)', 'RepQ-ViT + QwT (paper)', 'RepQ-ViT (this project)',
          'RepQ-ViT + QwT (this project)', 'Δ RepQ-ViT', 'Δ QwT', 'note')


def load_paper(path=PAPER_CSV):
    """The published table, one dict per row in file order, accuracies as floats."""
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        missing = [c for c in PAPER_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise UserError(f"{path}: missing column(s) {', '.join(missing)} (expected {','.join(PAPER_COLUMNS)})")
        rows = list(reader)
    for line, row in enumerate(rows, start=2):
        try:
            for k in ('fp_top1', 'repq_vit_top1', 'repq_vit_qwt_top1'):
                row[k] = float(row[k])
        except (TypeError, ValueError):
            raise UserError(f'{path} line {line}: {k} is {row[k]!r}, expected a number') from None
    return rows


def find_results(paths):
    """result.json files named by ``paths`` (files, or folders searched recursively), in argument order
    with each folder's files sorted, so that "the last file given" is well defined."""
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
    """Parse each result.json into a dict (plus 'path': the file), checking the keys the table needs."""
    out = []
    for path in files:
        try:
            with open(path) as f:
                r = json.load(f)
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
        for k in ('repq_top1', 'qwt_top1'):
            if r.get(k) is not None and not isinstance(r[k], (int, float)):
                raise UserError(f'{path}: {k} is {r[k]!r}, expected a number or null')
        out.append(dict(r, path=path))
    return out


def _delta(ours, paper):
    """This project minus the paper, None when either is missing."""
    return None if ours is None or paper is None else round(ours - paper, 4)


def _note(r):
    """Why a result may not be comparable with the paper's figure."""
    notes = []
    if 'random' in (r.get('weights'), r.get('source_weights')):  # source_weights: what a --load file was made from
        notes.append('random weights')
    if r.get('num_val') is not None and r.get('val_total') is not None and r['num_val'] < r['val_total']:
        notes.append(f"val subset {r['num_val']}/{r['val_total']}")
    if r.get('demo'):
        notes.append('demo')
    return '; '.join(notes)


def _row(model, fp_top1, bits, paper_repq, paper_qwt, r):
    """One table row; ``r`` is the matching result dict or None."""
    repq, qwt = (r.get('repq_top1'), r.get('qwt_top1')) if r else (None, None)
    return {'model': model, 'fp_top1': fp_top1, 'bits': bits, 'paper_repq': paper_repq, 'paper_qwt': paper_qwt,
            'repq': repq, 'qwt': qwt, 'delta_repq': _delta(repq, paper_repq), 'delta_qwt': _delta(qwt, paper_qwt),
            'note': _note(r) if r else ''}


def build_rows(paper, results, only_results=False):
    """Paper rows in paper order (only those with a result if ``only_results``), then the result
    configurations the paper lacks, sorted by model and bits. Returns (rows, warnings): one warning
    per configuration given more than once, where the last file wins."""
    by_config, warnings = {}, []
    for r in results:
        key = (r['timm_name'], f"W{r['w_bits']}/A{r['a_bits']}")
        if key in by_config:
            warnings.append(f"{key[0]} {key[1]}: {by_config[key]['path']} overridden by {r['path']} (last file wins)")
        by_config[key] = r
    rows = []
    for p in paper:
        r = by_config.pop((p['timm_name'], p['bits']), None)
        if r or not only_results:
            rows.append(_row(DISPLAY.get(p['model'], p['model']), p['fp_top1'], p['bits'],
                             p['repq_vit_top1'], p['repq_vit_qwt_top1'], r))
    known = {p['timm_name']: p for p in paper}  # the FP accuracy does not depend on the bits
    extra = []
    for (timm_name, bits), r in by_config.items():
        p = known.get(timm_name)
        short = p['model'] if p else r.get('model') or timm_name
        name = DISPLAY.get(short, short)
        extra.append(((name, r['w_bits'], r['a_bits']), _row(name, p['fp_top1'] if p else None, bits, None, None, r)))
    return rows + [row for _, row in sorted(extra, key=lambda e: e[0])], warnings


def _fmt(v, spec):
    """A number as ``spec``, empty for None."""
    return '' if v is None else format(v, spec)


def to_markdown(rows):
    """The table in Markdown: paper figures with one decimal as published, ours with two, signed deltas."""
    lines = ['| ' + ' | '.join(HEADER) + ' |', '|' + '---|' * len(HEADER)]
    for r in rows:
        cells = [r['model'], _fmt(r['fp_top1'], '.1f'), r['bits'], _fmt(r['paper_repq'], '.1f'),
                 _fmt(r['paper_qwt'], '.1f'), _fmt(r['repq'], '.2f'), _fmt(r['qwt'], '.2f'),
                 _fmt(r['delta_repq'], '+.2f'), _fmt(r['delta_qwt'], '+.2f'), r['note']]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def to_csv(rows):
    """The rows as CSV with the field names as header, numbers unrounded, empty for None."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator='\n')
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()

