"""The export pairs the weights with the tokenizer they were trained with: training records its SHA-256 with the
final weights and every checkpoint, and another tokenizer of the same size is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from pretrain.config import ModelConfig
from pretrain.errors import PipelineError
from pretrain.eval.sources import ModelSource
from pretrain.export.run import check_trained_tokenizer
from pretrain.model.gpt import GPT
from pretrain.parallel.distributed import DistContext
from pretrain.run_files import file_sha256
from pretrain.train.checkpoint import COMPLETE
from pretrain.train.weights import save_weights

CFG = ModelConfig(n_layer=1, n_head=2, d_model=32, vocab_size=64, seq_len=16)


def test_another_tokenizer_than_the_recorded_one_is_refused(tmp_path):
    trained = tmp_path / "trained.model"
    trained.write_bytes(b"the tokenizer the weights were trained with")
    swapped = tmp_path / "swapped.model"
    swapped.write_bytes(b"another tokenizer of the same size")
    weights = tmp_path / "run" / "checkpoints"
    save_weights(GPT(CFG), CFG, weights, DistContext(), zero_stage=0, tokenizer_sha256=file_sha256(trained))
    source = ModelSource("run", weights, tmp_path / "run", "run_dir")
    check_trained_tokenizer(source, trained)
    with pytest.raises(PipelineError, match=r"swapped.model \(SHA-256 \w{12}\.\.\.\) is not the one the weights in"):
        check_trained_tokenizer(source, swapped)
    step = weights / "step_00000002"  # a checkpoint: its complete.json records it
    step.mkdir()
    (step / COMPLETE).write_text(json.dumps({"step": 2, "tokenizer_sha256": file_sha256(trained)}))
    with pytest.raises(PipelineError, match="put that run's tokenizer back"):
        check_trained_tokenizer(ModelSource("run/step_00000002", step, None, "export.checkpoint"), swapped)
    torch.manual_seed(0)
    save_weights(GPT(CFG), CFG, tmp_path / "old", DistContext(), zero_stage=0)  # before the hash was recorded
    check_trained_tokenizer(ModelSource("old", tmp_path / "old", None, "export.checkpoint"), swapped)
