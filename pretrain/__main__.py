"""The program's entry point: ``pretrain`` and ``python -m pretrain`` (also under ``deepspeed --module``).

It adapts the launcher's command line for Hydra, composes and checks the config, and runs the stages.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def adapt_launcher_argv(argv: list[str]) -> list[str]:
    """Strip the ``--local_rank=K`` the DeepSpeed launcher appends (Hydra rejects it) into ``LOCAL_RANK``.

    Ranks other than 0 also turn off Hydra's ``.hydra/`` output and log file, so that only rank 0 writes
    into the shared run directory.
    """
    out = [argv[0]]
    rest = iter(argv[1:])
    for arg in rest:
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank"):
            os.environ.setdefault("LOCAL_RANK", next(rest, "0"))
        else:
            out.append(arg)
    if int(os.environ.get("RANK", "0")) != 0:
        out += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    return out


def unknown_key_message(args: list[str]) -> str | None:
    """One line naming the first override whose key the config does not have (Hydra's own message takes seven),
    with the closest known key; None when every key exists. ``+key=`` (append) and ``hydra.*`` are Hydra's own."""
    import dataclasses
    import difflib
    import typing

    from pretrain.config import Config

    for arg in args:
        key = arg.split("=", 1)[0]
        if "=" not in arg or key.startswith(("+", "~", "hydra.", "hydra/")) or key.startswith("--"):
            continue
        schema: typing.Any = Config
        parts = key.split(".")
        for depth, part in enumerate(parts):
            if not dataclasses.is_dataclass(schema):
                break  # below a free-form value (train.deepspeed): anything goes
            names = {f.name: f for f in dataclasses.fields(schema)}
            if part not in names:
                where = ".".join(parts[:depth])
                known = sorted(names)
                close = difflib.get_close_matches(part, known, n=1)
                full = [f"{where}.{name}" if where else name for name in known]
                hint = f"did you mean {full[known.index(close[0])]}? " if close else ""
                scope = f"{where}.* keys" if where else "top-level keys and groups"
                return f"error: unknown config key {key!r}; {hint}{scope}: {', '.join(full)}"
            field_type = names[part].type
            schema = typing.get_type_hints(schema)[part] if isinstance(field_type, str) else field_type
    return None


def main() -> None:
    sys.argv = adapt_launcher_argv(sys.argv)
    message = unknown_key_message(sys.argv[1:])
    if message is not None:
        print(message, file=sys.stderr)
        sys.exit(2)

    import hydra
    from omegaconf import DictConfig

    from pretrain.config import register_configs

    register_configs()

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
    def hydra_main(dict_cfg: DictConfig) -> None:
        from pretrain.pipeline import run_from_dictconfig

        run_from_dictconfig(dict_cfg)

    hydra_main()


if __name__ == "__main__":
    main()
