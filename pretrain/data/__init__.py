"""The prepare stage and what reads its output: corpus sources (``corpus``), the sentencepiece tokenizer
(``tokenizer``), token shards (``shards``), the stage itself (``prepare``) and the resumable loader
(``loader``)."""
