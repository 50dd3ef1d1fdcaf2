"""Pretraining pipeline for ALiBi GPT models.

Stages and their entry points:
- prepare: ``pretrain.prepare.run_prepare`` (tokenizer + packed token shards)
- train:   ``pretrain.train.run_train`` (the DeepSpeed loop)
The ALiBi math lives in ``pretrain.alibi``; attention kernels in ``pretrain.attention``; the model in
``pretrain.model``; configuration in ``pretrain.config``; the command line in ``pretrain.__main__``.
"""

__version__ = "0.1.0"
