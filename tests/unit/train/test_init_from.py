"""train.init_from: the weights of a run directory, a checkpoints directory, a weights file or an exported hf/
directory load into a new model; another shape or another tokenizer is one line naming both."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from pretrain.config import ModelConfig
from pretrain.errors import PipelineError
from pretrain.model.bloom import bloom_config, to_bloom_state_dict
from pretrain.model.gpt import GPT
from pretrain.parallel.distributed import DistContext
from pretrain.train.weights import load_init_weights, save_weights

CFG = ModelConfig(n_layer=1, n_head=2, d_model=32, vocab_size=64, seq_len=16)


def trained_run(tmp_path):
    torch.manual_seed(1)
    model = GPT(CFG)
    run_dir = tmp_path / "run"
    save_weights(model, CFG, run_dir / "checkpoints", DistContext(), zero_stage=0)
    (run_dir / "tokenizer").mkdir()
    (run_dir / "tokenizer" / "spm.model").write_bytes(b"the run's tokenizer")
    tokenizer = tmp_path / "spm.model"
    tokenizer.write_bytes(b"the run's tokenizer")
    return model, run_dir, tokenizer


@pytest.mark.parametrize("where", ["run_dir", "checkpoints", "weights_file", "hf"])
def test_weights_load_from_every_kind_of_path_at_another_seq_len(tmp_path, where):
    source, run_dir, tokenizer = trained_run(tmp_path)
    path = {"run_dir": run_dir, "checkpoints": run_dir / "checkpoints"}.get(where)
    if where == "weights_file":
        path = run_dir / "checkpoints" / "model.safetensors"
    if where == "hf":
        path = tmp_path / "hf"
        path.mkdir()
        (path / "config.json").write_text(json.dumps(bloom_config(CFG)))
        save_file(to_bloom_state_dict({k: v.contiguous() for k, v in source.state_dict().items()}),
                  str(path / "model.safetensors"))  # fmt: skip
    torch.manual_seed(2)
    longer = GPT(replace(CFG, seq_len=64))  # ALiBi has no position parameters: any training length
    note = load_init_weights(longer, str(path), tokenizer)
    assert note.startswith(f"initialised from {path}") and "start fresh" in note
    for name, value in source.state_dict().items():
        assert torch.equal(longer.state_dict()[name], value), name


def test_another_shape_or_tokenizer_is_one_line_naming_both(tmp_path):
    _, run_dir, tokenizer = trained_run(tmp_path)
    with pytest.raises(PipelineError, match=r"d_model=32.*d_model=64.*weight word_embeddings.weight is \(64, 32\)"):
        load_init_weights(GPT(replace(CFG, d_model=64)), str(run_dir), tokenizer)
    other = tmp_path / "other.model"
    other.write_bytes(b"another tokenizer")
    with pytest.raises(PipelineError, match="was trained with another tokenizer"):
        load_init_weights(GPT(CFG), str(run_dir), other)
    with pytest.raises(PipelineError, match="no such directory"):
        load_init_weights(GPT(CFG), str(tmp_path / "missing"), tokenizer)
