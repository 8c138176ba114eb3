"""QwT*: the QwT compensation and the classifier head(s) fine-tuned jointly after the closed-form fit, with
everything else frozen (SPEC §6). ``finetune`` is the whole run; the modules hold one concern each."""
from quant.finetune.config import FinetuneConfig, FinetuneResult
from quant.finetune.loop import finetune
from quant.finetune.params import prepare_for_finetune, trainable_parameters

__all__ = ['FinetuneConfig', 'FinetuneResult', 'finetune', 'prepare_for_finetune', 'trainable_parameters']
