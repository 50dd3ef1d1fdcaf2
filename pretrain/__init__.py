"""Pretraining pipeline for ALiBi GPT models. ``pretrain/README.md`` is the map of the package.

Stages and their entry points:
- prepare: ``pretrain.data.prepare.run_prepare`` (tokenizer + packed token shards)
- train:   ``pretrain.train.loop.run_train`` (the DeepSpeed loop)
- eval:    ``pretrain.eval.run.run_eval`` (perplexity against length, windowed control, passkey)
They are chained by ``pretrain.pipeline``; the command line is ``pretrain.__main__``. The ALiBi math lives in
``pretrain.ops.alibi`` (public name ``pretrain.alibi``), the kernels in ``pretrain.ops.attention`` (public name
``pretrain.attention``), the model in ``pretrain.model``.
"""

__version__ = "0.1.0"
