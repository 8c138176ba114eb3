"""Post-training quantizers behind --ptq (the registry: utils/run/ptq.py): the project's RepQ-ViT and Percentile
(quant.ptq.project) and brevitas's min-max and GPTQ (quant.ptq.brevitas_ptq, imported only when used)."""
