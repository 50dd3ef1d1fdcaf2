"""The prompts of ``stage=generate``: ``generate.prompt``, then every non-empty line of ``generate.prompt_file``."""

from __future__ import annotations

from pathlib import Path

from pretrain.config import GenerateConfig
from pretrain.errors import ConfigError, PipelineError


def read_prompts(gcfg: GenerateConfig) -> list[str]:
    """The prompts in order; none at all, an empty ``generate.prompt`` or a missing file is one clear error.

    A prompt file holds one prompt a line: the line's end is not part of the prompt, its other whitespace is
    (indentation matters to a model of code); empty lines are skipped.
    """
    prompts: list[str] = []
    if gcfg.prompt is not None:
        prompt = str(gcfg.prompt)
        if not prompt:
            raise ConfigError('generate.prompt="" is empty; give some text to continue')
        prompts.append(prompt)
    if gcfg.prompt_file is not None:
        path = Path(str(gcfg.prompt_file)).expanduser()
        if not path.is_file():
            raise PipelineError(
                f"generate.prompt_file={gcfg.prompt_file!r}: no such file (give a text file, one prompt a line)"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise PipelineError(f"generate.prompt_file={gcfg.prompt_file!r} is not UTF-8 text ({err})") from None
        # Lines end at "\n" (and "\r\n") only: str.splitlines would also split at form feeds, which code holds.
        lines = [line.removesuffix("\r") for line in text.split("\n")]
        lines = [line for line in lines if line]
        if not lines:
            raise PipelineError(f"generate.prompt_file={gcfg.prompt_file!r} holds no prompt (every line is empty)")
        prompts.extend(lines)
    if not prompts:
        raise ConfigError(
            'stage=generate needs a prompt: give generate.prompt="TEXT" or generate.prompt_file=PATH '
            "(one prompt a line)"
        )
    return prompts
