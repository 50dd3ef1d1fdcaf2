"""The GPT (``gpt``) and every position encoding (``positions``). The model knows nothing of parallelism or
training: both are applied to it from outside."""
