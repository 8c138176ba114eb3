"""QwT* runs end to end on a tiny RepQ-ViT + QwT model (tests/finetune_driver.py): a run SIGKILLed between two
checkpoints and rerun on its checkpoint ends exactly as an uninterrupted run, on one process and on two gloo
processes; two processes at batch B end as one at batch 2B; a non-finite loss on one rank stops both ranks."""
import math
import multiprocessing
import signal

import pytest
import torch

import finetune_driver as driver
from conftest import free_port

STEPS = 2 * driver.IMAGES // 8  # 2 epochs of 48 images at a global batch of 8: 12 steps, checkpoints at 4, 8, 12
KILL_IN_STEP = 6                # killed while loading step 6's batch: after checkpoint 4, before checkpoint 8
NAN_IN_STEP = 6


def _group(jobs, world):
    """Start ``world`` driver processes running ``jobs`` in one gloo group, forked from this one (they inherit
    its imports: a fresh interpreter would spend seconds importing torch)."""
    port = free_port()
    context = multiprocessing.get_context('fork')
    procs = [context.Process(target=driver.main, args=(jobs, rank, world, port)) for rank in range(world)]
    for p in procs:
        p.start()
    return procs


def _wait(procs, expect_kill=False):
    want = -signal.SIGKILL if expect_kill else 0
    for p in procs:
        p.join(timeout=300)
        if p.exitcode is None:  # hung: leave no process behind
            p.kill()
            p.join()
            raise AssertionError('a driver process did not end within 300 s (its output is above)')
        assert p.exitcode == want, f'driver exit code {p.exitcode}, expected {want} (its output is above)'


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """Every run, the subprocesses side by side with the in-process ones; {name: saved output}."""
    d = tmp_path_factory.mktemp('qwtstar')

    def job(name, batch, **kw):
        return dict(out=str(d / f'{name}.pt'), checkpoint=str(d / f'{name}.ckpt'), batch=batch, **kw)

    # two processes, batch 4: an uninterrupted run, a run whose rank 1 turns NaN in step 6, a run killed in step 6
    two = [job('two', 4), job('two_nan', 4, nan_after=(NAN_IN_STEP - 1) * 4 + 1, nan_rank=1),
           job('two_killed', 4, kill_after=(KILL_IN_STEP - 1) * 4 + 2)]
    group = _group(two, 2)
    one_killed = job('one_killed', 8, mixup=0.8, kill_after=(KILL_IN_STEP - 1) * 8 + 3)
    killed = _group([one_killed], 1)
    driver.run_job(job('one', 8))                 # one process, batch 8 = 2 x 4
    driver.run_job(job('one_mixup', 8, mixup=0.8))  # the uninterrupted twin of one_killed (mixup draws numpy)
    _wait(killed, expect_kill=True)
    _wait(group, expect_kill=True)  # its last job kills both processes
    saved = {'killed_checkpoints': {k: torch.load(d / f'{k}.ckpt', weights_only=True)['step']
                                    for k in ('one_killed', 'two_killed', 'two_nan')}}
    resumed = _group([dict(two[2], kill_after=None)], 2)
    driver.run_job(dict(one_killed, kill_after=None))
    _wait(resumed)
    for name in ('one', 'one_mixup', 'one_killed', 'two', 'two_killed'):
        saved[name] = torch.load(d / f'{name}.pt', weights_only=False)
    saved['two_nan'] = [torch.load(d / f'two_nan.pt{suffix}', weights_only=False)['error'] for suffix in ('', '.rank1')]
    return saved


def _assert_same_run(a, b):
    assert list(a['trainable']) == list(b['trainable'])
    for name in a['trainable']:
        assert torch.equal(a['trainable'][name], b['trainable'][name]), name
    assert torch.equal(a['logits'], b['logits'])
    assert a['result']['loss_curve'] == b['result']['loss_curve']
    assert (a['result']['steps'], a['result']['images_seen']) == (b['result']['steps'], b['result']['images_seen'])


def test_killed_run_resumes_to_the_uninterrupted_result_on_one_process(runs):
    assert runs['killed_checkpoints']['one_killed'] == 4  # killed after checkpoint 4, before 8
    assert runs['one_killed']['result']['resumed_from'] == 4 and runs['one_mixup']['result']['resumed_from'] is None
    _assert_same_run(runs['one_killed'], runs['one_mixup'])
    assert runs['one']['result']['steps'] == STEPS and runs['one']['result']['images_seen'] == STEPS * 8
    # mixup changes the run: the comparison above is not between two runs that ignore the generators
    assert not torch.equal(runs['one']['logits'], runs['one_mixup']['logits'])


def test_killed_run_resumes_to_the_uninterrupted_result_on_two_processes(runs):
    assert runs['killed_checkpoints']['two_killed'] == 4
    assert runs['two_killed']['result']['resumed_from'] == 4
    _assert_same_run(runs['two_killed'], runs['two'])


def test_two_processes_at_batch_b_end_as_one_process_at_batch_2b(runs):
    one, two = runs['one'], runs['two']
    assert two['result']['images_seen'] == one['result']['images_seen'] == STEPS * 8
    for name, w in one['trainable'].items():
        torch.testing.assert_close(two['trainable'][name], w, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(two['logits'], one['logits'], rtol=1e-4, atol=1e-5)
    for (s1, l1), (s2, l2) in zip(one['result']['loss_curve'], two['result']['loss_curve']):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-5)
    # and the fine-tuning did something: the weights moved from the QwT fit by more than the tolerance
    model, _, _ = driver.quantized_model()
    start = {n: p.detach() for n, p in model.named_parameters()}
    assert max(float((w - start[n]).abs().max()) for n, w in one['trainable'].items()) > 1e-3  # 100 x atol


def test_non_finite_loss_on_one_rank_stops_both_ranks_with_the_same_line(runs):
    rank0, rank1 = runs['two_nan']
    assert rank0 == rank1
    # the cosine schedule over 12 steps, no warm-up: the learning rate of step 6 (t = 5), by hand
    lr = 1e-6 + 0.5 * (driver.LR - 1e-6) * (1 + math.cos(math.pi * 5 / STEPS))
    assert f'at step {NAN_IN_STEP} of {STEPS} (learning rate {lr:.3g})' in rank0
    assert 'loss is nan' in rank0 and '\n' not in rank0
    assert runs['killed_checkpoints']['two_nan'] == 4  # the last good checkpoint is kept
