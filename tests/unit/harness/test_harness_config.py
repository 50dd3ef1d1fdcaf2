"""The harness.* keys: defaults that leave the default run unchanged, and one clear message per bad value, through
Hydra's composition as a user types them."""

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pretrain.__main__ import CONF_DIR, unknown_key_message
from pretrain.config import HarnessConfig, register_configs
from pretrain.errors import ConfigError

register_configs()


def compose_config(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="config", overrides=overrides))


def test_defaults_score_nothing_so_the_default_run_is_unchanged():
    cfg = compose_config([])
    assert cfg.stage == "all" and cfg.harness.tasks == [] and cfg.harness.compare == []
    assert cfg.harness.max_length is None and cfg.harness.batch_size == 1


def test_values_as_typed_on_the_command_line():
    h = compose_config(
        [
            "stage=harness",
            "harness.tasks=[hellaswag,arc_easy]",
            "harness.num_fewshot=5",
            "harness.limit=0.25",
            "harness.batch_size=auto:4",
            "harness.max_length=4096",
            "harness.include_path=tasks",
            "harness.device=cuda:1",
            "harness.seed=7",
        ]
    ).harness
    assert h.tasks == ["hellaswag", "arc_easy"] and h.num_fewshot == 5 and h.limit == 0.25
    assert h.batch_size == "auto:4" and h.max_length == 4096 and h.device == "cuda:1" and h.seed == 7
    assert compose_config(["harness.batch_size=8"]).harness.batch_size == 8


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["harness.limit=0"], "harness.limit=0 is not allowed; give a whole number of examples per task >= 1"),
        (["harness.limit=-3"], "harness.limit=-3 is not allowed"),
        (["harness.limit=2.5"], "harness.limit=2.5 is not allowed"),
        (["harness.num_fewshot=-1"], "harness.num_fewshot=-1 is not allowed; it must be >= 0"),
        (["harness.batch_size=0"], "harness.batch_size='0' is not allowed; give a whole number >= 1, auto or auto:N"),
        (["harness.batch_size=big"], "harness.batch_size='big' is not allowed"),
        (["harness.batch_size=auto"], "harness.batch_size=auto needs harness.max_length=N"),
        (["harness.max_length=0"], "harness.max_length=0 is not allowed; it must be > 0"),
        (["harness.tasks=['']"], "harness.tasks holds ''"),
        (["harness.include_path=''"], "harness.include_path='' is not allowed"),
        (["harness.compare=['']"], "harness.compare holds an empty path"),
    ],
)
def test_bad_values_are_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose_config(overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_misspelt_key_names_the_harness_keys():
    message = unknown_key_message(["harness.task=[x]"])
    assert "did you mean harness.tasks?" in message and "harness.num_fewshot" in message


def test_the_schema_alone_checks_too():
    with pytest.raises(ConfigError, match="harness.limit=0 is not allowed"):
        HarnessConfig(limit=0)
    assert HarnessConfig(limit=10).limit == 10
