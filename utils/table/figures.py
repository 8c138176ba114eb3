"""Figures of the results: the table as bars (published vs this project) and the r² of every QwT block
of one run. matplotlib is optional: it is imported only here, lazily, with its Agg canvas (no display,
no global backend change)."""
import math

from utils.core.files import write_atomic

NO_MATPLOTLIB = 'figures not written: matplotlib is not installed (pip install matplotlib)'


def _figure(width, height):
    """A matplotlib Figure on an Agg canvas, or None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def have_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _save(fig, path):
    write_atomic(path, lambda tmp: fig.savefig(tmp, format='png'))


# Bars of one row: (label, row key of the value, row key of the std, colour, hatch)
# ('{m}': the rows' PTQ method, utils.table.results.table_method)
BARS = (('{m} (paper)', 'paper_repq', None, '#9ecae1', '//'),
        ('{m} (this project)', 'repq', 'repq_std', '#3182bd', None),
        ('{m} + QwT (paper)', 'paper_qwt', None, '#fdae6b', '//'),
        ('{m} + QwT (this project)', 'qwt', 'qwt_std', '#e6550d', None))


def results_figure(rows, path):
    """results_table.png: one panel per model, a group of bars per bit width (and variant, marked *):
    the PTQ method (RepQ-ViT, Percentile) and it + QwT, published (hatched) next to this project's mean with the seed standard
    deviation as error bar; FP as horizontal lines (dashed: paper, solid: this project). The y axis of each
    panel starts below its lowest value, not at 0. Returns False (nothing written) without matplotlib."""
    models = []
    for r in rows:
        if r['model'] not in models:
            models.append(r['model'])
    cols = max(1, min(5, len(models)))
    nrows = max(1, math.ceil(len(models) / cols))
    width = max(7.0, 3.4 * cols)
    legend_cols = max(1, min(6, int(width / 2.2)))
    legend_rows = math.ceil(6 / legend_cols)
    height = 3.0 * nrows + 0.7 + 0.25 * legend_rows
    fig = _figure(width, height)
    if fig is None:
        return False
    axes = fig.subplots(nrows, cols, squeeze=False)
    bar = 0.2
    from utils.table.results import table_method
    method, with_method = table_method(rows)
    for i, model in enumerate(models):
        ax = axes[i // cols][i % cols]
        mine = [r for r in rows if r['model'] == model]
        values = []  # everything drawn, error bars included
        for g, r in enumerate(mine):
            for b, (label, key, std_key, colour, hatch) in enumerate(BARS):
                v = r[key]
                if v is None:
                    continue
                err = r[std_key] if std_key else None
                ax.bar(g + (b - 1.5) * bar, v, bar, color=colour, hatch=hatch, edgecolor='#444444',
                       linewidth=0.5, yerr=err, capsize=3 if err else 0, label=label.format(m=method) if i == 0 and g == 0 else None)
                values += [v - (err or 0), v + (err or 0)]
        fps = [(r['paper_fp'], '--', 'FP (paper)'), (next((r['fp'] for r in mine if r['fp'] is not None), None),
                                                     '-', 'FP (this project)')]
        for v, style, label in fps:
            if v is not None:
                ax.axhline(v, color='#555555', linestyle=style, linewidth=1, label=label if i == 0 else None)
                values.append(v)
        ax.set_xticks(range(len(mine)))
        ax.set_xticklabels([r['bits'] + ('*' if r['note'] and _is_variant(r) else '')
                            + (f"\n{r.get('method')}" if with_method else '') for r in mine])  # the method of each group
        ax.set_title(model, fontsize=10)
        top, low = max(values, default=1.0), min(values, default=0.0)
        # zoomed on the values (a few points apart at W4/A4), from a multiple of 10 below the lowest
        ax.set_ylim(max(0.0, math.floor((low - 5) / 10) * 10), min(100.0, top + 0.08 * (top - low) + 2))
        ax.set_ylabel('top-1 (%)', fontsize=8)
        ax.tick_params(labelsize=8)
    for j in range(len(models), nrows * cols):
        axes[j // cols][j % cols].set_visible(False)
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc='lower center', ncol=legend_cols, fontsize=8, frameon=False)
    fig.suptitle('ImageNet top-1, published (hatched) vs this project\n'
                 'error bars: std over seeds; lines: FP; * a variant (see the table note)', fontsize=9)
    fig.tight_layout(rect=(0, (0.1 + 0.25 * legend_rows) / height, 1, 1 - 0.4 / height))
    _save(fig, path)
    return True


def _is_variant(row):
    """Whether the row's note names a variant (not only missing seeds or skipped images)."""
    parts = [p for p in row['note'].split('; ') if p and not p.startswith('missing') and 'skipped' not in p]
    return bool(parts)


def r2_figure(result, path):
    """r2.png of one run: the r² of every QwT block's fit, blocks left uncompensated (r² <= 0, no fit, or
    before --start_block) in grey with an ×, those left out for a numerically singular fit (the published
    float32 inverse) in red with a !, fallback fits outlined in red. Returns False without matplotlib."""
    blocks = result.get('qwt_blocks') or []
    fig = _figure(max(5.0, 0.35 * len(blocks) + 2), 3.2)
    if fig is None:
        return False
    ax = fig.subplots()
    floor = -1.0
    lows = []
    for b in blocks:
        x, r2, used = b['block'], b.get('r2'), b.get('used')
        shown = 0.0 if r2 is None else max(r2, floor)
        singular = b.get('singular') and not used
        ax.bar(x, shown, 0.7, color='#3182bd' if used else '#fcbba1' if singular else '#bdbdbd',
               edgecolor='#de2d26' if b.get('fallback') else '#444444', linewidth=1.5 if b.get('fallback') else 0.5)
        if singular:
            ax.text(x, max(shown, 0) + 0.03, '!', color='#de2d26', ha='center', va='bottom', fontweight='bold')
        elif not used:
            ax.plot(x, max(shown, 0) + 0.03, marker='x', color='#de2d26', markersize=6)
        if r2 is not None and r2 < floor:
            ax.annotate(f'{r2:.3g}', (x, floor), fontsize=6, ha='center', va='bottom')
        lows.append(shown)
    n_used = sum(bool(b.get('used')) for b in blocks)
    n_singular = sum(bool(b.get('singular')) and not b.get('used') for b in blocks)
    ax.set_xlabel('block')
    ax.set_ylabel('r² of the QwT fit')
    ax.set_xticks([b['block'] for b in blocks])
    ax.tick_params(labelsize=7)
    ax.set_ylim(min([0.0, *lows]) - 0.05, 1.08)
    ax.axhline(0, color='#444444', linewidth=0.5)
    ax.set_title(f"{result.get('model')} W{result.get('w_bits')}/A{result.get('a_bits')} seed {result.get('seed')}: "
                 f"{n_used} of {len(blocks)} blocks compensated"
                 + (f", {n_singular} left out for a singular fit" if n_singular else '')
                 + "\n(grey with ×: fit did not help; red with !: singular float32 system, --qwt_solver lstsq "
                 "fits it; red outline: fallback fit)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return True
