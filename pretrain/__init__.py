"""Pretraining pipeline for ALiBi GPT models.

Stages and their entry points:
- prepare: ``pretrain.prepare.run_prepare`` (tokenizer + packed token shards)
- train:   ``pretrain.train.run_train`` (the DeepSpeed loop)
The ALiBi math lives in ``pretrain.ops.alibi``; attention kernels in ``pretrain.ops.attention``; the model in
``pretrain.model.gpt``; configuration in ``pretrain.config``; the command line in ``pretrain.__main__``.
"""

__version__ = "0.1.0"
