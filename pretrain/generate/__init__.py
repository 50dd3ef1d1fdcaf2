"""Text generation (``stage=generate``): decoding with an ALiBi KV cache, past the training length.

``sampling.py`` chooses tokens (greedy, temperature, top-k, top-p, seeded per prompt), ``prompts.py`` reads the
prompts, ``decode.py`` is the loop over the model's cache (``pretrain.model.kv_cache``), ``run.py`` the stage
(weights, tokenizer, ``generate/samples.jsonl``). See ``docs/generate.md``.
"""
