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


def main() -> None:
    sys.argv = adapt_launcher_argv(sys.argv)

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
