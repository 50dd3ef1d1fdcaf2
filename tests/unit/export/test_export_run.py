"""The export stage in-process on a run directory made by hand: what it writes, that transformers loads it with our
logits, the refusals, and that a failed export leaves the previous one whole."""

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from data_fixtures import stdlib_texts
from safetensors.torch import load_file, save_file

from pretrain.config import Config, DataConfig, ExportConfig, ModelConfig
from pretrain.data.tokenizer import train_tokenizer
from pretrain.errors import ConfigError, PipelineError
from pretrain.export import run as export_run
from pretrain.export.run import plan_export, run_export
from pretrain.model.gpt import GPT
from pretrain.parallel.distributed import DistContext
from pretrain.run_files import file_sha256

transformers = pytest.importorskip("transformers")
VOCAB = 600


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> bytes:
    texts = list(stdlib_texts(20).values())
    return train_tokenizer(texts, tmp_path_factory.mktemp("spm") / "spm", VOCAB).read_bytes()


def make_run(root: Path, spm_model: bytes, **model_overrides) -> tuple[Path, GPT]:
    cfg = ModelConfig(
        **{"n_layer": 2, "n_head": 6, "d_model": 48, "seq_len": 32, "vocab_size": VOCAB, **model_overrides}
    )
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    weights = root / "checkpoints"
    weights.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights / "model.safetensors"))
    (weights / "model.safetensors.sha256").write_text(
        f"{file_sha256(weights / 'model.safetensors')}  model.safetensors\n"
    )
    (weights / "model_config.json").write_text(json.dumps(asdict(cfg)))
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "spm.model").write_bytes(spm_model)
    (root / "train").mkdir()
    (root / "train" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 6.0 - s / 10, "lr": 1e-3, "tokens": 128 * s}) + "\n" for s in (1, 2))
    )
    (root / "eval").mkdir()
    cells = [{"length": 32, "depth": 0.5, "greedy": 0.25, "likelihood": 0.5, "key_depth": 0.5, "trials": 4}]
    results = {
        "train_seq_len": 32,
        "mode": "nonoverlapping",
        "models": [
            {
                "name": root.name,
                "source": str(weights),
                "train_seq_len": 32,
                "results": [
                    {
                        "length": n,
                        "loss": 5.0,
                        "ppl": 148.41,
                        "tokens": 1000,
                        "windowed_loss": 5.1,
                        "loss_minus_windowed": -0.1,
                    }
                    for n in (32, 256)
                ],
                "skipped": [],
                "passkey": {
                    "lengths": [32],
                    "depths": [0.5],
                    "trials": 4,
                    "distractors": 9,
                    "chance": 0.1,
                    "greedy_accuracy": 0.25,
                    "likelihood_accuracy": 0.5,
                    "cells": cells,
                    "skipped": [],
                },
            }
        ],
    }
    (root / "eval" / "results.json").write_text(json.dumps(results))
    (root / "eval" / "ppl_vs_length.png").write_bytes(b"\x89PNG fake")
    return root, model


def config(run: Path, tmp_path: Path, stage: str = "export", **export) -> Config:
    # No prepared corpus in this cache: the tokenizer is checked on the edge-case strings only.
    return Config(
        run_dir=str(run), stage=stage, data=DataConfig(cache_dir=str(tmp_path / "cache")), export=ExportConfig(**export)
    )


def test_export_loads_in_transformers_with_our_logits_at_1x_and_8x(tmp_path, spm_model):
    run, model = make_run(tmp_path / "run", spm_model)
    lines = []
    hf = run_export(config(run, tmp_path), DistContext(), say=lines.append)
    assert hf == run / "hf" and any("[export] wrote" in line for line in lines)
    names = {p.name for p in hf.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "README.md",
        "ppl_vs_length.png",
    } <= names
    assert not list(run.glob(".hf.*"))
    bloom = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    assert type(bloom).__name__ == "BloomForCausalLM"
    for length in (32, 256):
        ids = torch.randint(0, VOCAB, (2, length))
        with torch.no_grad():
            assert (bloom(ids).logits - model(ids)).abs().max().item() < 1e-4
    card = (hf / "README.md").read_text()
    assert "| 256 | 8 | 5.0000 | 148.41 | 1,000 | 5.1000 | -0.1000 |" in card
    assert "![perplexity against evaluation length](ppl_vs_length.png)" in card
    assert "greedy 25%, likelihood 50%" in card and "| optimizer steps | 2 |" in card
    assert "Note: this evaluation scored" not in card


def test_bf16_export_of_another_directory_replaces_the_previous_export(tmp_path, spm_model):
    run, _ = make_run(tmp_path / "run", spm_model)
    other, _ = make_run(tmp_path / "other", spm_model)
    run_export(config(run, tmp_path), DistContext(), say=lambda _: None)
    run_export(
        config(run, tmp_path, checkpoint=str(other / "checkpoints" / "model.safetensors"), dtype="bf16"),
        DistContext(),
        say=lambda _: None,
    )
    hf = run / "hf"
    assert json.loads((hf / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(str(hf / "model.safetensors")).values()} == {torch.bfloat16}
    assert "Note: this evaluation scored" not in (hf / "README.md").read_text()  # other's own eval
    assert not list(run.glob(".hf.*"))


def test_failed_export_leaves_the_previous_one_whole(tmp_path, spm_model, monkeypatch):
    run, _ = make_run(tmp_path / "run", spm_model)
    run_export(config(run, tmp_path), DistContext(), say=lambda _: None)
    before = {p.name: p.read_bytes() for p in (run / "hf").iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_run, "model_card", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        run_export(config(run, tmp_path, dtype="bf16"), DistContext(), say=lambda _: None)
    assert {p.name: p.read_bytes() for p in (run / "hf").iterdir()} == before
    assert not list(run.glob(".hf.*"))


@pytest.mark.parametrize(
    "overrides, named",
    [(dict(bias=False), "model.bias=false"), (dict(pos_encoding="rope"), "model.pos_encoding=rope")],
)
def test_unrepresentable_model_is_refused_before_anything_is_written(tmp_path, spm_model, overrides, named):
    run, _ = make_run(tmp_path / "run", spm_model, **overrides)
    with pytest.raises(ConfigError, match=named):
        plan_export(config(run, tmp_path))
    with pytest.raises(ConfigError, match=named):
        run_export(config(run, tmp_path), DistContext(), say=lambda _: None)
    lines = []
    assert run_export(config(run, tmp_path, stage="all"), DistContext(), say=lines.append) is None
    assert len(lines) == 1 and lines[0].startswith("[export] skipped: ") and named in lines[0]
    assert not (run / "hf").exists() and not list(run.glob(".hf.*"))


def test_missing_weights_and_vocabulary_mismatch_are_one_line_errors(tmp_path, spm_model):
    with pytest.raises(PipelineError, match="no trained weights in .*export.checkpoint=PATH"):
        plan_export(config(tmp_path / "empty", tmp_path))
    with pytest.raises(PipelineError, match="export.checkpoint='/nonexistent': no such file"):
        plan_export(config(tmp_path / "empty", tmp_path, checkpoint="/nonexistent"))
    run, _ = make_run(tmp_path / "run", spm_model, vocab_size=VOCAB + 8)
    with pytest.raises(PipelineError, match=f"vocabulary of {VOCAB + 8}, but the tokenizer .* has {VOCAB} pieces"):
        run_export(config(run, tmp_path), DistContext(), say=lambda _: None)
    assert not (run / "hf").exists() and not list(run.glob(".hf.*"))
