"""Whether what a run saved is what it reads back: file checksums of a checkpoint, and finite weights.

A checkpoint's ``complete.json`` records the SHA-256 of every file of the checkpoint (ranks hash a share each).
Loading verifies them first, so a flipped bit or a truncated file is found before DeepSpeed unpickles a byte,
and a resume can fall back to an older checkpoint that verifies. A checkpoint written before checksums were
recorded has none to verify: it is loaded as before.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pretrain.parallel.distributed import DistContext, all_ranks, gather_objects
from pretrain.run_files import file_sha256

# Not hashed: the record itself, and the per-save scratch that DeepSpeed never reads back.
UNHASHED = {"complete.json"}


def checkpoint_files(step_dir: Path) -> list[str]:
    """The files of a checkpoint directory, relative to it, sorted (the same list on every rank)."""
    step_dir = Path(step_dir)
    return sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file() and p.name not in UNHASHED)


def checksums(step_dir: Path, ctx: DistContext) -> dict[str, str]:
    """``{relative path: sha256}`` of every file of ``step_dir``; each rank hashes every world_size-th file."""
    files = checkpoint_files(step_dir)
    mine = {name: file_sha256(Path(step_dir) / name) for name in files[ctx.rank :: ctx.world_size]}
    merged: dict[str, str] = {}
    for part in gather_objects(mine, ctx):
        merged.update(part)
    return merged


def verify_checksums(step_dir: Path, recorded: dict[str, str] | None, ctx: DistContext | None = None) -> str | None:
    """None when every file ``recorded`` names is there with its checksum; otherwise what is wrong, naming the
    first bad file. ``recorded`` None (an older checkpoint) verifies nothing. With ``ctx``, ranks share the work
    and all get the same answer."""
    if recorded is None:
        return None
    ctx = ctx or DistContext()
    step_dir = Path(step_dir)
    problems = []
    for name in sorted(recorded)[ctx.rank :: ctx.world_size]:
        path = step_dir / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif file_sha256(path) != recorded[name]:
            problems.append(f"{path} does not match the checksum recorded when it was saved (corrupt or truncated)")
    for part in gather_objects(problems, ctx):
        if part:
            return part[0]
    return None


def nonfinite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors of a state dict holding NaN or infinity."""
    return [
        name
        for name, tensor in state.items()
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


def parameters_finite(model: torch.nn.Module, ctx: DistContext) -> bool:
    """Whether every rank's parameters are finite. Under ZeRO-3 a rank holds a partition of each parameter
    (``ds_tensor``); it checks that."""
    finite = True
    with torch.no_grad():
        for param in model.parameters():
            data = getattr(param, "ds_tensor", param)
            if data.numel() and not bool(torch.isfinite(data).all()):
                finite = False
                break
    return all_ranks(finite, ctx)
