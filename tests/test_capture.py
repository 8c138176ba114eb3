"""tools/capture_inputs.py: the images a script really feeds itself, captured from its DataLoader
iterations, against --dump_inputs; and the comparison that says where two captures differ."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT, save_random_checkpoint
from utils.run import cli
from utils.table.capture import compare_inputs
from utils.run.demo import make_image_folder

TOOL = os.path.join(ROOT, 'tools', 'capture_inputs.py')
ENTRY = os.path.join(ROOT, 'tests', 'tiny_entry.py')


def tool(*args):
    from tools import capture_inputs
    with pytest.raises(SystemExit) as e:
        capture_inputs.main([str(a) for a in args])
    return e.value.code


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('capture')
    root = make_image_folder(str(tmp / 'data'), classes=3, train_per_class=8, val_per_class=2)
    return tmp, root, save_random_checkpoint('vit_test_tiny', str(tmp / 'tiny.pth'))


def flags(tmp, root, ckpt, out):
    return ['--model', 'vit_test_tiny', '--data_dir', root, '--checkpoint', ckpt, '--batch_size', '4',
            '--qwt_samples', '8', '--num_workers', '2', '--device', 'cpu', '--output_dir', str(tmp / out)]


@pytest.mark.parametrize('evaluate', ['repq', 'both'])
def test_a_whole_run_feeds_itself_what_dump_inputs_writes(setup, evaluate):
    """A real run (calibration, evaluation before QwT or not) captured by the tool: the same files and
    pixels as --dump_inputs, and the capture stops the run before the QwT fit (no result.json)."""
    tmp, root, ckpt = setup
    cli.main('vit', flags(tmp, root, ckpt, 'dump') + ['--dump_inputs', str(tmp / 'ours.pth')])
    out = tmp / f'captured_{evaluate}.pth'
    assert tool('capture', '--data_dir', root, '--out', out, '--qwt_samples', 8, '--',
                ENTRY, *flags(tmp, root, ckpt, f'run_{evaluate}'), '--eval', evaluate) == 0
    got, ours = torch.load(out), torch.load(tmp / 'ours.pth')
    assert got['calib'].shape == (4, 3, 32, 32) and got['qwt'].shape == (8, 3, 32, 32)
    assert len(got['calib_files']) == 4 and len(got['qwt_files']) == 8
    assert all(f.startswith('train' + os.sep) for f in got['calib_files'] + got['qwt_files'])
    assert compare_inputs(got, ours) == []
    assert torch.equal(got['qwt'], ours['qwt']) and got['qwt_files'] == ours['qwt_files']
    assert not os.path.exists(tmp / f'run_{evaluate}' / 'result.json')
    assert tool('compare', out, tmp / 'ours.pth') == 0


def test_another_seed_is_told_apart(setup, capsys):
    tmp, root, ckpt = setup
    cli.main('vit', flags(tmp, root, ckpt, 'dump') + ['--dump_inputs', str(tmp / 'seed0.pth')])
    cli.main('vit', flags(tmp, root, ckpt, 'dump') + ['--dump_inputs', str(tmp / 'seed1.pth'), '--seed', '1'])
    capsys.readouterr()
    assert tool('compare', tmp / 'seed0.pth', tmp / 'seed1.pth') == 1
    out = capsys.readouterr().out
    assert 'calib_files: 4 vs 4 files, first difference at' in out and out.rstrip().endswith(
        f"different: 4 calibration and 8 QwT images in {tmp / 'seed0.pth'}")


def test_compare_names_the_first_differing_image():
    a = {'calib': torch.zeros(2, 3, 4, 4), 'qwt': torch.zeros(3, 3, 4, 4), 'calib_files': ['a', 'b'],
         'qwt_files': ['c', 'd', 'e']}
    b = {**a, 'qwt': a['qwt'].clone(), 'qwt_files': ['c', 'x', 'e']}
    b['qwt'][2, 1, 0, 0] = 0.5
    assert compare_inputs(a, a) == []
    assert compare_inputs(a, b) == ['qwt_files: 3 vs 3 files, first difference at 1',
                                    'qwt: 1 of 3 images differ, the first at 2; largest difference 0.5']
    assert compare_inputs(a, {**a, 'calib': torch.zeros(2, 3, 4, 4, dtype=torch.float64)}) == [
        'calib: (2, 3, 4, 4) torch.float32 vs (2, 3, 4, 4) torch.float64']


def test_a_script_that_never_draws_qwt_images_is_a_one_line_error(setup, tmp_path, capfd):
    tmp, root, ckpt = setup
    script = tmp_path / 'calibrate_only.py'
    script.write_text(textwrap.dedent(f"""
        from timm.data import ImageDataset
        from torch.utils.data import DataLoader
        import torchvision.transforms as T
        data = ImageDataset({os.path.join(root, 'train')!r}, transform=T.Compose([T.Resize((8, 8)), T.ToTensor()]))
        next(iter(DataLoader(data, batch_size=4, shuffle=True)))
    """))
    assert tool('capture', '--data_dir', root, '--out', tmp_path / 'x.pth', '--', script) == 2
    assert capfd.readouterr().err.startswith(
        f"error: {script} finished after 1 iteration(s) over {os.path.realpath(os.path.join(root, 'train'))} "
        'and 0 QwT image(s)')
    assert not os.path.exists(tmp_path / 'x.pth')


def test_cpu_flag_lets_a_cuda_only_script_run(setup, tmp_path):
    """--cpu: .cuda() calls become no-ops; the tool stops the script at its 4th QwT image and writes it."""
    tmp, root, ckpt = setup
    script = tmp_path / 'cuda_only.py'
    script.write_text(textwrap.dedent(f"""
        import torch
        from timm.data import ImageDataset
        from torch.utils.data import DataLoader
        import torchvision.transforms as T
        data = ImageDataset({os.path.join(root, 'train')!r}, transform=T.Compose([T.Resize((8, 8)), T.ToTensor()]))
        loader = DataLoader(data, batch_size=2, shuffle=True, num_workers=2)
        calib = next(iter(loader))[0].cuda()
        torch.nn.Linear(2, 2).cuda()
        for images, _ in loader:
            images.cuda()
        raise SystemExit('not stopped')
    """))
    def capture(*extra):
        return subprocess.run([sys.executable, TOOL, 'capture', '--data_dir', root, '--out', str(tmp_path / 'c.pth'),
                               '--qwt_samples', '4', *extra, str(script)], capture_output=True, text=True)
    if not torch.cuda.is_available():
        assert capture().returncode != 0 and not os.path.exists(tmp_path / 'c.pth')
    p = capture('--cpu')
    assert p.returncode == 0, p.stderr
    got = torch.load(tmp_path / 'c.pth')
    assert got['calib'].shape == (2, 3, 8, 8) and got['qwt'].shape == (4, 3, 8, 8) and len(got['qwt_files']) == 4
    names = sorted(os.path.join('train', c, f) for c in os.listdir(os.path.join(root, 'train'))
                   for f in os.listdir(os.path.join(root, 'train', c)))
    assert set(got['qwt_files']) <= set(names) and len(set(got['qwt_files'])) == 4


def test_files_of_a_subset_loader_are_mapped_to_the_folder(setup):
    """A loader over a Subset of the training folder: the recorded files are those of the Subset's indices,
    in the order the loader yields them, and the images are the batches it yields."""
    import torchvision.transforms as T
    from timm.data import ImageDataset
    from torch.utils.data import DataLoader, Subset
    from utils.table.capture import InputCapture, InputsCaptured
    _, root, _ = setup
    base = ImageDataset(os.path.join(root, 'train'), transform=T.Compose([T.Resize((4, 4)), T.ToTensor()]))
    order = [17, 3, 11, 0, 22, 5]
    loader = DataLoader(Subset(base, order), batch_size=2, num_workers=2)
    capture = InputCapture(root, qwt_images=4)
    with capture.installed():
        calib = next(iter(loader))[0]
        seen = []
        with pytest.raises(InputsCaptured):
            for images, _ in loader:
                seen.append(images)
    assert capture.calib_files == [os.path.join('train', base.filename(i)) for i in order[:2]]
    assert capture.payload()['qwt_files'] == [os.path.join('train', base.filename(i)) for i in order[:4]]
    assert torch.equal(capture.calib, calib) and torch.equal(seen[0], capture.payload()['qwt'][:2])
    assert torch.equal(capture.payload()['qwt'], torch.stack([base[i][0] for i in order[:4]]))


def test_the_script_imports_its_own_packages_not_the_projects(setup, tmp_path):
    """The published code has `utils` and `quant` packages of its own: the script runs where this project's
    packages do not shadow them (they did when it ran in the tool's process)."""
    _, root, _ = setup
    for package, module in (('utils', 'build_model'), ('quant', 'quant_model'), ('models', 'zoo')):
        (tmp_path / package).mkdir()
        (tmp_path / package / '__init__.py').write_text('')
        (tmp_path / package / f'{module}.py').write_text(f'NAME = {package + "." + module!r}\n')
    script = _two_pass_script(tmp_path / 'published_like.py', root, prelude=textwrap.dedent("""
        from utils.build_model import NAME as a
        from quant.quant_model import NAME as b
        from models.zoo import NAME as c
        assert (a, b, c) == ('utils.build_model', 'quant.quant_model', 'models.zoo'), (a, b, c)
        import utils
        assert not hasattr(utils, 'capture'), 'the project utils package is visible'
    """))
    assert tool('capture', '--data_dir', root, '--out', tmp_path / 'o.pth', '--qwt_samples', 4, '--', script) == 0
    got = torch.load(tmp_path / 'o.pth')
    assert got['qwt'].shape == (4, 3, 4, 4) and len(got['calib_files']) == 2


def test_cuda_on_cpu_maps_every_cuda_device_to_the_cpu():
    from utils.table.capture import cuda_on_cpu
    cpu = torch.device('cpu')
    with cuda_on_cpu():
        made = [torch.zeros(2, device='cuda:0'), torch.ones(1, device=torch.device('cuda')),
                torch.arange(3).to('cuda'), torch.arange(3).to(torch.device('cuda', 0), torch.float64),
                torch.arange(3).to(device='cuda:0'), torch.arange(3).cuda()]
        module = torch.nn.Linear(2, 2).to('cuda:0').cuda()
        torch.cuda.synchronize()
        assert torch.zeros(3).to(torch.float16).dtype == torch.float16  # other .to() arguments kept
    assert [t.device for t in made] == [cpu] * 6 and made[3].dtype == torch.float64
    assert module.weight.device == cpu
    if not torch.cuda.is_available():  # restored on exit
        with pytest.raises((RuntimeError, AssertionError)):
            torch.zeros(1, device='cuda')


def _two_pass_script(path, root, prelude=''):
    path.write_text(prelude + textwrap.dedent(f"""
        from timm.data import ImageDataset
        from torch.utils.data import DataLoader
        import torchvision.transforms as T
        data = ImageDataset({os.path.join(root, 'train')!r}, transform=T.Compose([T.Resize((4, 4)), T.ToTensor()]))
        loader = DataLoader(data, batch_size=2, shuffle=True)
        next(iter(loader))
        for batch in loader:
            pass
    """))
    return path


def test_under_a_launcher_each_rank_writes_its_share(setup, tmp_path, monkeypatch):
    """WORLD_SIZE 2, RANK 1: this process's 4 / 2 QwT images, written to OUT.rank1."""
    _, root, _ = setup
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setenv('RANK', '1')
    script = _two_pass_script(tmp_path / 'two_pass.py', root)
    assert tool('capture', '--data_dir', root, '--out', tmp_path / 'out.pth', '--qwt_samples', 4, '--', script) == 0
    assert not os.path.exists(tmp_path / 'out.pth')
    got = torch.load(tmp_path / 'out.pth.rank1')
    assert got['qwt'].shape == (2, 3, 4, 4) and len(got['qwt_files']) == 2 and len(got['calib_files']) == 2


@pytest.mark.parametrize('world_size,samples', [(1, 0), (2, 3)])
def test_qwt_samples_that_do_not_split_over_the_processes_are_refused(setup, tmp_path, monkeypatch, capsys,
                                                                      world_size, samples):
    _, root, _ = setup
    monkeypatch.setenv('WORLD_SIZE', str(world_size))
    script = _two_pass_script(tmp_path / 'two_pass.py', root)
    assert tool('capture', '--data_dir', root, '--out', tmp_path / 'o.pth', '--qwt_samples', samples, '--', script) == 2
    assert capsys.readouterr().err == (f'error: --qwt_samples {samples} must be a positive multiple of WORLD_SIZE '
                                       f'{world_size}\n')


def test_the_script_runs_in_a_scratch_folder_unless_its_files_are_kept(setup, tmp_path, monkeypatch):
    """The published script writes checkpoint/<model>/.../log.txt into its current folder: the capture runs it
    in a scratch folder of its own (removed), or in --keep_files DIR; relative paths still reach it."""
    tmp, root, ckpt = setup
    script = tmp_path / 'writes.py'
    script.write_text(textwrap.dedent(f"""
        import os, sys
        from timm.data import ImageDataset
        from torch.utils.data import DataLoader
        import torchvision.transforms as T
        os.makedirs('checkpoint', exist_ok=True)
        open(os.path.join('checkpoint', 'log.txt'), 'w').write(os.getcwd())
        data = ImageDataset(os.path.join(sys.argv[1], 'train'), transform=T.Compose([T.Resize((8, 8)), T.ToTensor()]))
        loader = DataLoader(data, batch_size=2, shuffle=True)
        next(iter(loader))
        for images, _ in loader:
            pass
    """))
    monkeypatch.chdir(tmp_path)
    os.symlink(root, tmp_path / 'data')
    assert tool('capture', '--data_dir', 'data', '--out', 'c.pth', '--qwt_samples', 4, '--', 'writes.py', 'data') == 0
    assert os.path.exists(tmp_path / 'c.pth') and not os.path.exists(tmp_path / 'checkpoint')
    from tools import capture_inputs
    calls = []
    monkeypatch.setattr(capture_inputs.subprocess, 'call', lambda argv, cwd: calls.append((argv, cwd)) or 0)
    assert tool('capture', '--data_dir', 'data', '--out', 'd.pth', '--keep_files', 'kept', '--', 'writes.py', 'data',
                '--flag=data', 'new') == 0
    (argv, cwd), = calls
    assert cwd == 'kept' and os.path.isdir(tmp_path / 'kept')  # kept: not removed
    assert argv[-4:] == \
        ['--', str(tmp_path / 'data'), f"--flag={tmp_path / 'data'}", 'new']
    assert argv[argv.index('--out') + 1] == str(tmp_path / 'd.pth') and str(tmp_path / 'writes.py') in argv


def test_compare_names_only_the_images_that_differ(capsys, tmp_path):
    a = {'calib': torch.zeros(2, 3, 4, 4), 'qwt': torch.zeros(3, 3, 4, 4), 'calib_files': ['a', 'b'],
         'qwt_files': ['c', 'd', 'e']}
    b = {**a, 'qwt_files': ['c', 'x', 'e']}
    torch.save(a, tmp_path / 'a.pth')
    torch.save(b, tmp_path / 'b.pth')
    assert tool('compare', tmp_path / 'a.pth', tmp_path / 'b.pth') == 1
    assert capsys.readouterr().out.splitlines()[-1] == \
        f"different: 3 QwT images in {tmp_path / 'a.pth'} (the 2 calibration images are identical)"
