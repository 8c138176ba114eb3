"""The counts the README states about the table runner are those of its plan (issue 29, finding 4): the
README's whole-table command, planned here (nothing runs), and the sentences that count its cells."""
import re

import pytest

from conftest import ROOT
from tools.readme_figures import README
from utils.runner import cells as table_cells, flags as runner_flags
from utils.run.demo import make_image_folder

TEXT = ' '.join(open(README).read().split())


@pytest.fixture(scope='module')
def plan(tmp_path_factory):
    """The README's `python tools/reproduce.py --data_dir DIR --seeds 0 1 2`: (models, bit widths, seeds,
    quantized cells, FP cells)."""
    tmp = tmp_path_factory.mktemp('counts')
    data = make_image_folder(str(tmp / 'data'))
    args = runner_flags.build_parser().parse_args(['--data_dir', data, '--seeds', '0', '1', '2', '--device', 'cpu',
                                                   '--output_dir', str(tmp / 'out')])
    cells, _ = table_cells.plan(args)
    quant = [c for c in cells if c.kind == 'quant']
    fp = [c for c in cells if c.kind == 'fp']
    return (len({c.model for c in cells}), len({(c.w_bits, c.a_bits) for c in quant}), len({c.seed for c in quant}),
            len(quant), len(fp), sorted({c.model for c in cells if c.family == 'resnet'}))


def test_the_whole_table_command_counts_what_the_plan_holds(plan):
    models, widths, seeds, quant, fp, resnets = plan
    assert (widths, seeds) == (2, 3) and quant == models * widths * seeds
    m = re.search(r'runs the (\d+) models of the two tables above \((\d+) ViT, DeiT and Swin, (\d+) ResNet\) at '
                  r'W4/A4 and W6/A6 .*? for each seed: (\d+) x (\d+) x (\d+) = (\d+) cells, plus one `--eval fp` cell '
                  r'per model for the FP column \((\d+);', TEXT)
    assert m, 'README: the sentence under `python tools/reproduce.py --data_dir ... --seeds 0 1 2` is gone'
    n, vit, resnet, a, b, c, cells, n_fp = map(int, m.groups())
    assert (n, vit + resnet, a, b, c, cells, n_fp) == (models, models, models, widths, seeds, quant, fp)
    assert resnet == len(resnets) == 3


def test_the_slurm_section_counts_what_the_plan_holds(plan):
    models, widths, seeds, quant, fp, _ = plan
    m = re.search(r'The whole table, (\d+) models x W4/A4 and W6/A6 x (\d+) seeds \((\d+) cells, plus (\d+) FP '
                  r'cells\)', TEXT)
    assert m, 'README: the SLURM section no longer counts the whole table'
    assert tuple(map(int, m.groups())) == (models, seeds, quant, fp)

