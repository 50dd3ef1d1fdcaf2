"""The generate stage's inputs and output: prompts, weights, the learned table's limit, samples.jsonl."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from pretrain.config import Config, DataConfig, GenerateConfig, ModelConfig
from pretrain.data.tokenizer import train_tokenizer
from pretrain.errors import ConfigError, PipelineError
from pretrain.generate.prompts import read_prompts
from pretrain.generate.run import check_length, run_generate
from pretrain.model.gpt import GPT
from pretrain.parallel.distributed import DistContext
from pretrain.pipeline import check_before_work
from pretrain.run_files import RunFiles
from pretrain.train.weights import save_weights


def test_prompts_from_the_key_and_the_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("def f(x):\r\n\n    return x  \n\x0cafter a form feed\n", encoding="utf-8")
    got = read_prompts(GenerateConfig(prompt="import os", prompt_file=str(path)))
    assert got == ["import os", "def f(x):", "    return x  ", "\x0cafter a form feed"]


@pytest.mark.parametrize(
    "gcfg, error, message",
    [
        (GenerateConfig(), ConfigError, 'needs a prompt: give generate.prompt="TEXT" or generate.prompt_file=PATH'),
        (GenerateConfig(prompt=""), ConfigError, 'generate.prompt="" is empty'),
        (GenerateConfig(prompt_file="/no/such/prompts.txt"), PipelineError, "prompt_file='/no/such/prompts.txt': no"),
    ],
)
def test_no_prompt_is_one_clear_line(gcfg, error, message):
    with pytest.raises(error, match=message):
        read_prompts(gcfg)


def config(tmp_path, **generate) -> Config:
    return Config(
        stage="generate",
        run_dir=str(tmp_path / "run"),
        data=DataConfig(cache_dir=str(tmp_path / "data")),
        generate=GenerateConfig(**generate),
    )


def test_checked_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="needs a prompt"):
        check_before_work(config(tmp_path), 1)
    with pytest.raises(PipelineError, match=r"no trained weights in .*generate.checkpoint=PATH$"):
        check_before_work(config(tmp_path, prompt="x"), 1)
    with pytest.raises(PipelineError, match="generate.checkpoint='/nowhere': no such file"):
        check_before_work(config(tmp_path, prompt="x", checkpoint="/nowhere"), 1)
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


def test_a_learned_table_is_not_read_past_its_rows():
    cfg = ModelConfig(pos_encoding="learned", seq_len=64)
    check_length(cfg, 60, 5)  # positions 0..63
    with pytest.raises(PipelineError, match=r"reads at most 64 positions .* lower generate.max_new_tokens to 5"):
        check_length(cfg, 60, 6)
    with pytest.raises(PipelineError, match="shorten the prompt"):
        check_length(cfg, 70, 1)
    check_length(ModelConfig(pos_encoding="alibi", seq_len=64), 10_000, 10_000)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run directory with a tokenizer and the final weights of a small (untrained) model."""
    root = tmp_path_factory.mktemp("generate")
    files = RunFiles(root / "run")
    files.tokenizer.parent.mkdir(parents=True)
    text = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 40
    train_tokenizer([text], files.tokenizer.with_suffix(""), vocab_size=300)
    model_cfg = ModelConfig(n_layer=1, n_head=2, d_model=32, seq_len=16, vocab_size=300)
    torch.manual_seed(0)
    save_weights(GPT(model_cfg), model_cfg, files.checkpoints, DistContext(), zero_stage=0)
    return root, SimpleNamespace(tokenizer_path=files.tokenizer, vocab_size=300)


def test_the_stage_prints_and_writes_samples(trained_run, tmp_path, capsys):
    root, corpus = trained_run
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("def add(a, b):\n    return\n")
    cfg = config(root, prompt="class", prompt_file=str(prompt_file), max_new_tokens=40, temperature=0, batch_size=2)
    samples = run_generate(cfg, DistContext(), corpus)
    lines = RunFiles(cfg.run_dir).generate_samples.read_text().splitlines()
    assert [json.loads(line) for line in lines] == samples
    assert [s["prompt"] for s in samples] == ["class", "def add(a, b):", "    return"]
    for sample in samples:
        assert set(sample) == {"prompt", "text", "token_ids"}
        assert 0 < len(sample["token_ids"]) <= 40 and 3 not in sample["token_ids"]  # </s> ends, is not kept
    out = capsys.readouterr().out
    assert "[generate] 3 prompt(s)" in out and "--- 3/3: '    return'" in out and "tokens/s" in out
    assert samples[0]["text"] in out
    # Sampling is seeded: the same command, the same samples.
    cfg.generate.temperature = 1.0
    assert run_generate(cfg, DistContext(), corpus) == run_generate(cfg, DistContext(), corpus)
