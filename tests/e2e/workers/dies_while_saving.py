"""``pretrain`` in which one rank is killed (SIGKILL, as by the OOM killer or a dying node) in the middle of writing
a checkpoint: its ZeRO optimizer partition for step ``DIE_AT_STEP`` is half written when rank ``DIE_ON_RANK`` dies."""

from __future__ import annotations

import os
import signal

import torch

real_save = torch.save
step_dir = f"step_{int(os.environ['DIE_AT_STEP']):08d}"


def save_then_die(obj, f, *args, **kwargs):
    path = str(f)
    if step_dir in path and path.endswith("optim_states.pt") and os.environ.get("RANK") == os.environ["DIE_ON_RANK"]:
        with open(path, "wb") as half:
            half.write(b"\x80\x02" + b"\x00" * 4096)  # the first bytes of a pickle, then nothing useful
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)


torch.save = save_then_die

from pretrain.__main__ import main  # noqa: E402  (after the patch: DeepSpeed saves through torch.save)

main()
