"""Running out of memory: recognise it (torch's allocator, cuBLAS/cuSOLVER/cuDNN handles, the host's
allocator) and name what helps for the stage that ran out. Lowering --batch_size is rarely the answer:
it changes the published calibration batch and does nothing for QwT, whose memory grows with
--qwt_samples and the concatenated features."""
import torch

# Library failures that are allocation failures in disguise: a handle or workspace cuBLAS, cuSOLVER or
# cuDNN could not allocate, a kernel launch without memory, the CPU allocator.
_SIGNS = ('out of memory', 'ALLOC_FAILED', "can't allocate memory", 'CUDNN_STATUS_NOT_ENOUGH_WORKSPACE')

ADVICE = {
    'qwt': "QwT holds every block's features of all --qwt_samples images: --qwt_accumulate normal needs a fraction "
           "of that memory (the same fit to float tolerance), fewer --qwt_samples less (not the published 512), and "
           "more GPUs (torchrun --nproc_per_node N) split the images",
    'ptq': 'the post-training quantizer (--ptq) calibrates on one batch of --batch_size images (32 as published; a '
           'smaller batch changes the calibration): use a device with more memory',
    'eval': 'evaluation: rerun with --save PATH (written before evaluation), then evaluate with --load PATH and a '
            'smaller --batch_size, which then changes nothing but the evaluation batches',
    'build': 'the full-precision model does not fit: use a device with more memory',
}
STAGE_OF = {'qwt_data': 'qwt', 'calibration_data': 'ptq', 'data': 'ptq', 'save': 'qwt'}


def is_out_of_memory(exc):
    return (isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError))
            or any(sign in str(exc) for sign in _SIGNS))


def on_gpu(exc):
    return isinstance(exc, torch.cuda.OutOfMemoryError) or any(k in str(exc) for k in ('CUDA', 'CUBLAS', 'CUSOLVER',
                                                                                        'CUDNN'))


def advice(stage, gpu):
    """What to do when ``stage`` (a Stopwatch stage name, or None) ran out of memory."""
    where = 'GPU memory' if gpu else 'memory (RAM)'
    key = STAGE_OF.get(stage, stage)
    if key not in ADVICE:
        return f'out of {where}: use a device with more memory, or fewer processes per node'
    return f'out of {where} in stage {key}: {ADVICE[key]}'


def describe(exc, detail):
    """The one-line error for ``exc``, an out-of-memory failure (``detail``: its message on one line)."""
    return f"{advice(getattr(exc, 'qwt_stage', None), on_gpu(exc))} ({detail[:300]})"
