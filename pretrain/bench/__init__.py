"""Benchmarks, run as ``python -m pretrain.bench NAME [options]`` (``NAME --help`` lists a benchmark's options).

Each benchmark is a module of this package with ``main(argv, prog) -> int``; ``BENCHMARKS`` is the one list
of them, so adding one (a training step, ``prepare``) is a module plus a line here.
"""

from __future__ import annotations

# name -> (module, one-line description for --help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "attention": (
        "pretrain.bench.attention",
        "forward+backward time and peak extra memory of the ALiBi attention backends against length",
    ),
    "sequence_parallel": (
        "pretrain.bench.sequence_parallel",
        "per-rank peak memory and time of a training step with each sequence split over ranks",
    ),
    "train_step": (
        "pretrain.bench.train_step",
        "tokens/s and peak memory of a training step: our GPT under DeepSpeed against Hugging Face's BLOOM",
    ),
    "gpu": (
        "pretrain.bench.gpu",
        "the GPU acceptance run: FlexAttention against the reference, attention and training-step speed, long eval",
    ),
    "prepare": (
        "pretrain.bench.prepare",
        "tokens/s of the prepare stage on the stdlib corpus; --sections: CPU cost, workers, RSS, temp disk by size",
    ),
    "loader": (
        "pretrain.bench.loader",
        "first-batch time, peak RSS per rank and read amplification of the training loader on a sparse corpus",
    ),
    "generate": (
        "pretrain.bench.generate",
        "decoding tokens/s with the KV cache against re-running the full prefix and transformers' generate",
    ),
    "architectures": (
        "pretrain.bench.architectures",
        "grouped-query attention's training step, decoding and KV cache by n_kv_head; each export class's greedy "
        "tokens",
    ),
    "train_short_test_long": (
        "pretrain.bench.train_short_test_long",
        "the ALiBi paper's claim from finished runs (launch/train_short_test_long.sh): table, plot and answer",
    ),
}
