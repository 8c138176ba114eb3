"""A stand-in for the entry scripts in tests of tools/reproduce.py (its --script): the same flags, no torch,
and OUTPUT_DIR/log.txt and result.json written in a fraction of a second. Run under torchrun, only rank 0
writes. Behaviour from the environment:

  STAND_IN_ACC    JSON {"<model> W4/A4 seed 0": [ptq_top1, qwt_top1], "<model> W4/A4 <--ptq> seed 0": [...],
                  "<model> FP": fp_top1}; other runs get accuracies made from the seed
  STAND_IN_FAIL   a model name: its runs print 'error: ...' and exit 2
  STAND_IN_SLEEP  seconds to wait before writing the result
  STAND_IN_SLEEP_ONCE  CELL:SECONDS: the first run into the output folder named CELL (a marker file there says
                  it ran) waits SECONDS more, its later runs do not (a job to be preempted whatever the
                  machine's load, then its requeued run)
  STAND_IN_LOG    a file that gets one JSON line per process: pid, start, end, argv and launcher variables
  STAND_IN_PID    set: print 'pid <pid>' first thing
  STAND_IN_DEAF   set: ignore SIGINT (a run that does not stop on Ctrl-C)
  STAND_IN_TERM_S seconds a SIGTERM takes to end the run (exit 143), as torchrun's shutdown of its workers
"""
import argparse
import importlib.util
import json
import os
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# models/registry.py alone: importing the package would import torch
spec = importlib.util.spec_from_file_location('registry', os.path.join(ROOT, 'models', 'registry.py'))
registry = importlib.util.module_from_spec(spec)
spec.loader.exec_module(registry)


def main():
    start = time.time()
    if os.environ.get('STAND_IN_DEAF'):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.environ.get('STAND_IN_TERM_S'):
        def slow_end(signum, frame):
            time.sleep(float(os.environ['STAND_IN_TERM_S']))
            os._exit(143)
        signal.signal(signal.SIGTERM, slow_end)
    if os.environ.get('STAND_IN_PID'):
        print(f'pid {os.getpid()}', flush=True)
    p = argparse.ArgumentParser()
    for flag in ('--model', '--data_dir', '--checkpoint', '--output_dir', '--device', '--eval', '--ptq'):
        p.add_argument(flag)
    for flag, default in (('--w_bit', 4), ('--a_bit', 4), ('--seed', 0), ('--batch_size', 32), ('--qwt_samples', 512),
                          ('--num_val', None), ('--start_block', 0)):
        p.add_argument(flag, type=int, default=default)
    args, _ = p.parse_known_args()
    rank = int(os.environ.get('RANK', '0'))
    if os.environ.get('STAND_IN_FAIL') == args.model:
        print('loading...\nerror: stand-in failure of ' + args.model, file=sys.stderr)
        sys.exit(2)
    time.sleep(float(os.environ.get('STAND_IN_SLEEP', '0')))
    cell, _, seconds = os.environ.get('STAND_IN_SLEEP_ONCE', '').rpartition(':')
    marker = os.path.join(args.output_dir or '.', 'stand_in_ran')
    if cell and os.path.basename(os.path.normpath(args.output_dir or '.')) == cell and not os.path.exists(marker):
        os.makedirs(args.output_dir, exist_ok=True)
        open(marker, 'w').close()
        time.sleep(float(seconds))
    fp = args.eval == 'fp'
    spec = registry.resolve_model(args.model)
    ptq = args.ptq or ('percentile' if spec.family == 'resnet' else 'repq')
    method = f' {ptq}' if args.ptq else ''
    key = f'{args.model} FP' if fp else f'{args.model} W{args.w_bit}/A{args.a_bit}{method} seed {args.seed}'
    acc = json.loads(os.environ.get('STAND_IN_ACC', '{}')).get(key)
    if acc is None:
        acc = 80.0 if fp else [50.0 + args.seed, 55.0 + args.seed]
    n_val = 100 if args.num_val is None else min(args.num_val, 100)
    result = {
        'model': args.model, 'timm_name': spec.timm_name, 'ptq': ptq,
        'w_bits': args.w_bit, 'a_bits': args.a_bit, 'eval': args.eval, 'seed': args.seed,
        'world_size': int(os.environ.get('WORLD_SIZE', '1')), 'device': args.device,
        'weights': 'checkpoint' if args.checkpoint else 'pretrained', 'demo': False, 'data_dir': args.data_dir,
        'checkpoint': args.checkpoint, 'num_val': n_val, 'val_total': 100,
        'num_calib': None if fp else args.batch_size, 'num_qwt': None if fp else args.qwt_samples,
        'start_block': None if fp else args.start_block, 'qwt_solver': None if fp else 'inverse',
        'qwt_accumulate': None if fp else 'concat',
        'fp_top1': acc if fp else None, 'ptq_top1': None if fp else acc[0], 'qwt_top1': None if fp else acc[1],
        'qwt_blocks': [] if fp else [{'block': i, 'r2': r2, 'used': r2 > 0, 'fallback': None}
                                     for i, r2 in enumerate((0.9, 0.5, -0.2, 0.7))],
        'skipped_images': [], 'timings': {}, 'versions': {},
    }
    if rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, 'log.txt'), 'a') as f:
            f.write(f'stand-in run of {key}\n')
        tmp = os.path.join(args.output_dir, 'result.json.tmp')
        with open(tmp, 'w') as f:
            json.dump(result, f)
        os.replace(tmp, os.path.join(args.output_dir, 'result.json'))
    if os.environ.get('STAND_IN_LOG'):
        env = {k: os.environ.get(k) for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'CUDA_VISIBLE_DEVICES',
                                             'OMP_NUM_THREADS')}
        with open(os.environ['STAND_IN_LOG'], 'a') as f:
            f.write(json.dumps({'pid': os.getpid(), 'key': key, 'start': start, 'end': time.time(),
                                'argv': sys.argv[1:], 'env': env}) + '\n')
    print(f'done {key}')


if __name__ == '__main__':
    main()
