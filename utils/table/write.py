"""The one writer of the results table: PREFIX.md, PREFIX.csv, PREFIX.png (with matplotlib) and the r2.png of
chosen runs, for tools/make_table.py and the table runner alike."""
import os

from utils.core.files import write_text_atomic
from utils.table import figures
from utils.table import results as table


def write_table(rows, prefix, r2_results=(), keep_fresh_r2=False):
    """Writes the table of ``rows`` (results.build_rows) and, with matplotlib, its figure and an r2.png next to
    the result.json of every run in ``r2_results`` (loaded results, each with its 'path'); with
    ``keep_fresh_r2``, an r2.png newer than its result.json is left as it is. Returns (the Markdown, the
    paths written, the number of r2.png files written or kept)."""
    md = table.to_markdown(rows)
    write_text_atomic(prefix + '.md', md)
    write_text_atomic(prefix + '.csv', table.to_csv(rows))
    written, n_r2 = [prefix + '.md', prefix + '.csv'], 0
    if figures.results_figure(rows, prefix + '.png'):
        written.append(prefix + '.png')
        for r in r2_results:
            png = os.path.join(os.path.dirname(r['path']), 'r2.png')
            if not (keep_fresh_r2 and os.path.exists(png) and os.path.getmtime(png) >= os.path.getmtime(r['path'])):
                figures.r2_figure(r, png)
            n_r2 += 1
    return md, written, n_r2
