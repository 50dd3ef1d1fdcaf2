"""Every shipped config composes, and bad values fail with a message that names them."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pretrain.__main__ import CONF_DIR, adapt_launcher_argv
from pretrain.config import ModelConfig, register_configs
from pretrain.errors import ConfigError

register_configs()
GROUPS = ["model", "data", "train", "parallel", "eval", "wandb"]
GPT3_SHAPES = {"125m": (12, 768, 12), "350m": (24, 1024, 16), "760m": (24, 1536, 16), "1.3b": (24, 2048, 16)}
# Options that cannot compose without required values (data=files needs paths, data=hf a name).
REQUIRED = {("data", "files"): ["data.paths=[x.txt]"], ("data", "hf"): ["data.name=json"]}


def compose_config(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="config", overrides=overrides))


@pytest.mark.parametrize(
    "group, option",
    [(g, p.stem) for g in GROUPS for p in sorted((Path(CONF_DIR) / g).glob("*.yaml"))],
)
def test_every_shipped_config_composes(group, option):
    cfg = compose_config([f"{group}={option}", *REQUIRED.get((group, option), [])])
    assert getattr(cfg, group) is not None


@pytest.mark.parametrize("name, shape", sorted(GPT3_SHAPES.items()))
def test_gpt3_shapes(name, shape):
    model = compose_config([f"model={name}"]).model
    assert (model.n_layer, model.d_model, model.n_head) == shape


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_head=5), "model.d_model=128 is not divisible by model.n_head=5"),
        (dict(pos_encoding="xpos"), "model.pos_encoding='xpos' is not allowed; choose one of: alibi, sinusoidal"),
        (dict(attention="flash"), "model.attention='flash' is not allowed; choose one of: fused, sdpa, eager"),
        (dict(n_layer=0), "model.n_layer=0 is not allowed; it must be > 0"),
        (dict(dropout=1.0), "model.dropout=1.0"),
    ],
)
def test_bad_model_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**overrides)


def test_bad_value_through_composition_is_caught_before_work():
    with pytest.raises(ConfigError, match="model.n_head=3"):
        compose_config(["model.n_head=3"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["model.n_head=5"], "error: model.d_model=128 is not divisible by model.n_head=5"),
        (["model.pos_encoding=xpos"], "error: model.pos_encoding='xpos' is not allowed"),
        (["model.no_such_key=1"], "Key 'no_such_key' not in 'ModelConfig'"),
        (["train.lr=abc"], "train.lr"),
    ],
)
def test_command_line_errors_are_one_clear_message(args, message):
    proc = subprocess.run([sys.executable, "-m", "pretrain", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_launcher_local_rank_argument_is_accepted(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("RANK", "0")
    assert adapt_launcher_argv(["pretrain", "--local_rank=1", "model=tiny"]) == ["pretrain", "model=tiny"]
    import os

    assert os.environ["LOCAL_RANK"] == "1"
    monkeypatch.setenv("RANK", "1")
    argv = adapt_launcher_argv(["pretrain", "--local_rank", "0"])
    assert "hydra.output_subdir=null" in argv and "0" not in argv
