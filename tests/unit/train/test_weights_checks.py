"""Weights checked before use: a model_config.json that is not the tensors' (another n_head, another shape), and
train.init_from's checks, the same for every kind of path (an exported hf/ included): the tokenizer the weights were
trained with, and tensors that are not floating point."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest
import torch
from data_fixtures import stdlib_texts
from safetensors.torch import save_file

from pretrain.config import ModelConfig
from pretrain.data.tokenizer import train_tokenizer
from pretrain.errors import PipelineError
from pretrain.export.tokenizer import tokenizer_files
from pretrain.model.bloom import bloom_config, to_bloom_state_dict
from pretrain.model.gpt import GPT
from pretrain.parallel.distributed import DistContext
from pretrain.run_files import file_sha256
from pretrain.train.weights import (
    MODEL_CONFIG,
    WEIGHTS,
    WEIGHTS_CHECKSUM,
    load_init_weights,
    load_weights,
    recorded_tokenizer_sha256,
    save_weights,
)

CFG = ModelConfig(n_layer=2, n_head=2, d_model=32, vocab_size=64, seq_len=16)


def saved(directory, cfg=CFG, tokenizer_sha256=None):
    torch.manual_seed(0)
    save_weights(GPT(cfg), cfg, directory, DistContext(), zero_stage=0, tokenizer_sha256=tokenizer_sha256)
    return directory


def edit_config(directory, **values):
    path = directory / MODEL_CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


def rewrite(directory, state):
    """Weights written by hand (no model config in their metadata), with a matching checksum."""
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / WEIGHTS))
    (directory / WEIGHTS_CHECKSUM).write_text(f"{file_sha256(directory / WEIGHTS)}  {WEIGHTS}\n")


def test_a_model_config_that_is_not_the_one_of_the_weights_is_one_line(tmp_path):
    directory = saved(tmp_path / "w")
    assert load_weights(directory)[0] == CFG
    edit_config(directory, n_head=4)  # same tensor shapes: caught by the config recorded in the weights file
    with pytest.raises(PipelineError, match=r"model_config.json says n_head=4, but .* saved with n_head=2"):
        load_weights(directory)
    rewrite(directory, GPT(CFG).state_dict())  # weights of an earlier release: no recorded config, shapes only
    edit_config(directory, n_head=2, n_layer=3)
    with pytest.raises(PipelineError, match=r"n_layer=3.*weight h.2.\S+ is .* hold no such tensor"):
        load_weights(directory)
    edit_config(directory, n_layer=1)
    with pytest.raises(PipelineError, match=r"without weight h.1.\S+, which the weights beside it hold"):
        load_weights(directory)
    edit_config(directory, n_layer=2, d_model=48)
    with pytest.raises(PipelineError, match=r"weight word_embeddings.weight is \(64, 48\).*hold \(64, 32\)"):
        load_weights(directory)
    edit_config(directory, d_model=32, n_head=5)
    with pytest.raises(PipelineError, match=r"model_config.json is not a usable model config .*n_head=5"):
        load_weights(directory)


def test_the_tokenizer_hash_is_recorded_with_the_final_weights(tmp_path):
    directory = saved(tmp_path / "w", tokenizer_sha256="ab" * 32)
    assert recorded_tokenizer_sha256(directory) == "ab" * 32
    assert load_weights(directory)[0] == CFG  # the extra key is not part of the model config
    assert recorded_tokenizer_sha256(saved(tmp_path / "old")) is None


def test_init_from_refuses_a_tensor_that_is_not_floating_point_from_every_kind_of_path(tmp_path):
    tokenizer = tmp_path / "spm.model"
    tokenizer.write_bytes(b"a tokenizer")
    state = GPT(CFG).state_dict()
    state["h.0.mlp.dense_h_to_4h.weight"] = torch.ones_like(state["h.0.mlp.dense_h_to_4h.weight"], dtype=torch.int8)
    run = saved(tmp_path / "run" / "checkpoints").parent
    rewrite(run / "checkpoints", state)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(bloom_config(CFG)))
    save_file({k: v.contiguous() for k, v in to_bloom_state_dict(state).items()}, str(hf / WEIGHTS))
    for path in (run, hf):
        with pytest.raises(
            PipelineError, match=r"weight h.0.mlp.dense_h_to_4h.weight in .* is int8, not floating point"
        ):
            load_init_weights(GPT(CFG), str(path), tokenizer)


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> bytes:
    return train_tokenizer(list(stdlib_texts(8).values()), tmp_path_factory.mktemp("spm") / "spm", 600).read_bytes()


def exported(root, spm_model, cfg):
    """An export as ``stage=export`` writes it into ``root/hf``, with ``root``'s tokenizer."""
    hf = root / "hf"
    hf.mkdir(parents=True)
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in to_bloom_state_dict(GPT(cfg).state_dict()).items()}, str(hf / WEIGHTS))
    (hf / "config.json").write_text(json.dumps(bloom_config(cfg)))
    for name, text in tokenizer_files(spm_model).items():
        (hf / name).write_text(text, encoding="utf-8")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "spm.model").write_bytes(spm_model)
    return hf


def test_init_from_an_export_checks_its_tokenizer_like_a_run_directory(tmp_path, spm_model):
    cfg = replace(CFG, vocab_size=600)
    ours = tmp_path / "spm.model"
    ours.write_bytes(spm_model)
    hf = exported(tmp_path / "run", spm_model, cfg)
    assert "initialised from" in load_init_weights(GPT(cfg), str(hf), ours)
    other = tmp_path / "other.model"
    other.write_bytes(spm_model + b"\0")  # another file: the run's tokenizer is not this one
    with pytest.raises(PipelineError, match=r"was trained with another tokenizer \(.*run/tokenizer/spm.model\)"):
        load_init_weights(GPT(cfg), str(hf), other)
    (tmp_path / "run" / "tokenizer" / "spm.model").unlink()  # an export copied out of its run: its tokenizer.json
    tokenizer_json = json.loads((hf / "tokenizer.json").read_text())
    vocab = tokenizer_json["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (hf / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    with pytest.raises(PipelineError, match=r"comes with another tokenizer \(.*tokenizer.json: id 10 is"):
        load_init_weights(GPT(cfg), str(hf), ours)


def test_init_from_compares_the_tokenizer_hash_recorded_with_the_weights(tmp_path):
    tokenizer = tmp_path / "spm.model"
    tokenizer.write_bytes(b"this run's tokenizer")
    run = saved(tmp_path / "run" / "checkpoints", tokenizer_sha256="ab" * 32).parent  # no tokenizer/ beside it
    for path in (run, run / "checkpoints", run / "checkpoints" / WEIGHTS):
        with pytest.raises(PipelineError, match=r"another tokenizer \(SHA-256 abababababab\.\.\., recorded"):
            load_init_weights(GPT(CFG), str(path), tokenizer)
    edit_config(run / "checkpoints", tokenizer_sha256=file_sha256(tokenizer))
    assert "initialised from" in load_init_weights(GPT(CFG), str(run), tokenizer)
    assert asdict(CFG) == {
        k: v for k, v in json.loads((run / "checkpoints" / MODEL_CONFIG).read_text()).items() if k != "tokenizer_sha256"
    }
