"""Every shipped config composes, bad values fail with a message that names them, and the launcher's
--local_rank argument is accepted."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pretrain.__main__ import CONF_DIR, adapt_launcher_argv
from pretrain.config import EvalConfig, ModelConfig, register_configs
from pretrain.errors import ConfigError

register_configs()
GROUPS = ["model", "data", "train", "parallel", "eval", "wandb"]
GPT3_SHAPES = {"125m": (12, 768, 12), "350m": (24, 1024, 16), "760m": (24, 1536, 16), "1.3b": (24, 2048, 16)}
# Options that cannot compose without required values (data=files needs paths, data=hf a name).
REQUIRED = {
    ("data", "files"): ["data.paths=[x.txt]"],
    ("data", "hf"): ["data.name=json"],
    ("data", "mix"): ["data.sources=[{kind: stdlib, weight: 1}]"],
}


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


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(mode="sliding", stride=32, lengths=[32, 64]), "eval.stride=32 is not allowed: it must be smaller"),
        (dict(stride=16), "eval.stride=16 is for eval.mode=sliding"),
        (dict(mode="rolling"), "eval.mode='rolling' is not allowed; choose one of: nonoverlapping, sliding"),
        (dict(lengths=[]), r"eval.lengths=\[\] is not allowed"),
        (dict(lengths=[0]), r"eval.lengths\[\]=0 is not allowed"),
        (dict(max_tokens=0), "eval.max_tokens=0 is not allowed"),
        (dict(passkey_depths=[1.5]), r"eval.passkey_depths holds 1.5; every depth must be in \[0, 1\]"),
        (dict(passkey_trials=0), "eval.passkey_trials=0 is not allowed"),
        (dict(compare=[""]), "eval.compare holds an empty path"),
    ],
)
def test_bad_eval_values_are_refused_before_any_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        EvalConfig(**overrides)


def test_bad_value_through_composition_is_caught_before_work():
    with pytest.raises(ConfigError, match="model.n_head=3"):
        compose_config(["model.n_head=3"])


def test_launcher_local_rank_argument_is_accepted(monkeypatch):
    # Set first so that monkeypatch restores its absence: a LOCAL_RANK=1 left in this process would reach every
    # command the later tests start (lm-eval then scores on no process).
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("RANK", "0")
    assert adapt_launcher_argv(["pretrain", "--local_rank=1", "model=tiny"]) == ["pretrain", "model=tiny"]
    import os

    assert os.environ["LOCAL_RANK"] == "1"
    monkeypatch.setenv("RANK", "1")
    argv = adapt_launcher_argv(["pretrain", "--local_rank", "0"])
    assert "hydra.output_subdir=null" in argv and "0" not in argv


def test_watch_and_select_keys_are_checked():
    from pretrain.config import EvalConfig, TrainConfig, select_multiple

    assert TrainConfig(eval_lengths=[]).eval_lengths == []
    with pytest.raises(ConfigError, match=r"train.eval_lengths holds 0"):
        TrainConfig(eval_lengths=[1, 0])
    with pytest.raises(ConfigError, match=r"train.profile=\[5, 3\] is not allowed"):
        TrainConfig(profile=[5, 3])
    assert select_multiple("last") is None and select_multiple("best_at:4") == 4
    with pytest.raises(ConfigError, match="eval.select='best:4' is not allowed"):
        EvalConfig(select="best:4")
