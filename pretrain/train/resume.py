"""What may change when a run resumes from a checkpoint, checked before anything is loaded or written.

A checkpoint continues one model on one corpus: the model's shape and position encoding, and the train shard
(recorded in ``complete.json``), must be the checkpoint's; a new run from its weights is ``train.init_from``.
The keys that shape the optimization (``RESUME_OVERRIDABLE``, plus ``train.seed`` and ``train.zero_stage``) must be
the checkpoint's too, unless ``train.resume_override`` names them: then the new value applies from the resumed
step on, and the change is logged. Everything else (``train.max_steps``, checkpoint and eval intervals, limits)
may change freely.
"""

from __future__ import annotations

import math
from dataclasses import asdict, replace

from pretrain.config import RESUME_OVERRIDABLE, Config, ModelConfig
from pretrain.errors import PipelineError
from pretrain.model.positions import embed_scale, is_absolute
from pretrain.train.optim import lr_multiplier

# Model keys that do not change the function the weights compute (the attention backend computes the same
# attention) or only matter at initialisation.
MODEL_FREE = ("attention", "dropout", "init_std")
# DeepSpeed's optimizer state differs by precision (an fp16 loss scaler, bf16 master weights): a checkpoint cannot
# be loaded under another one, so a precision change is never offered as an override.
# The length schedule: the loader's position is one of its phases' (a new schedule is a new run, train.init_from).
TRAIN_FIXED = ("train.seed", "train.zero_stage", "train.precision", "train.seq_len_schedule")


# Compared as the global batch they make with the data-parallel ranks: 2 ranks -> 1 rank with grad_accum doubled is
# the same run.
BATCH_KEYS = ("train.micro_batch_size", "train.grad_accum")


def legacy_model_keys(saved: dict) -> dict:
    """The values of the model keys added with grouped-query attention that a record without them was trained with."""
    return {
        "n_kv_head": saved.get("n_head"),
        "mlp": "gelu_tanh",
        "mlp_hidden": None,
        "norm": "layernorm" if saved.get("bias", True) else "layernorm_nobias",
        "alibi_slopes": "paper",
        "parallel_block": False,
    }


def train_record(cfg: Config, dp_size: int) -> dict:
    """The ``train.*`` values a checkpoint records, so that a resume can compare against them (``global_batch``:
    sequences per optimizer step over ``dp_size`` data-parallel ranks)."""
    keys = [key for key in RESUME_OVERRIDABLE + TRAIN_FIXED if key not in BATCH_KEYS]
    record = {key: getattr(cfg.train, key.removeprefix("train.")) for key in keys}
    record["global_batch"] = cfg.train.micro_batch_size * cfg.train.grad_accum * dp_size
    return record


def check_resume(
    record: dict, cfg: Config, model_cfg: ModelConfig, loader_state: dict, where: str, dp_size: int = 1
) -> list[str]:
    """Raise PipelineError (one line, naming both values) for a change a resume cannot make; return the overridden
    changes as lines to log. ``record`` is the checkpoint's ``complete.json``; a checkpoint of an earlier release
    lacks some entries, which are then not compared."""
    init_hint = f"to start a new run from these weights, use train.init_from={where} in another run_dir"
    saved_model = record.get("model_config")
    if saved_model is not None:
        # A record older than model.n_kv_head, model.mlp and model.norm holds the model those keys' defaults give
        # (n_kv_head = n_head, tanh-GELU, the norm model.bias implies): compared as such.
        saved_model = {**legacy_model_keys(saved_model), **saved_model}
        now = asdict(model_cfg)
        for key, saved in saved_model.items():
            if key in MODEL_FREE or key not in now or now[key] == saved:
                continue
            what = "the tokenizer's vocabulary (data.* settings)" if key == "vocab_size" else f"model.{key}"
            raise PipelineError(
                f"{what} is {now[key]!r} but checkpoint {where} holds a model with {key}={saved!r}; a resume continues "
                f"the same model: {init_hint}"
            )
        # The scale of absolute positions as trained: a record older than model.embed_scale was trained unscaled,
        # and a null one resolves through init_std (model/positions.py), which the loop above does not compare.
        if is_absolute(model_cfg.pos_encoding):
            trained_cfg = replace(
                model_cfg,
                embed_scale=saved_model.get("embed_scale", 1.0),
                init_std=saved_model.get("init_std", model_cfg.init_std),
            )
            trained, wanted = embed_scale(trained_cfg), embed_scale(model_cfg)
            if not math.isclose(trained, wanted):
                raise PipelineError(
                    f"model.embed_scale gives {wanted:g} but checkpoint {where} was trained with {trained:g}; pass "
                    f"model.embed_scale={trained:g} to resume it, or {init_hint}"
                )
    saved_loader = record.get("loader")
    if saved_loader is not None and saved_loader.get("version") != loader_state.get("version"):
        raise PipelineError(
            f"checkpoint {where} was saved by the loader of the one-file corpus format (loader state version "
            f"{saved_loader.get('version')!r}); this version reads sharded corpora in another order and cannot "
            f"continue its data stream exactly: {init_hint}"
        )
    if saved_loader is not None:
        for key in ("n_tokens", "checksum"):
            if saved_loader.get(key) != loader_state.get(key):
                raise PipelineError(
                    f"checkpoint {where} was trained on another train split (another corpus or tokenizer: "
                    f"{key} {saved_loader.get(key)!r}, now {loader_state.get(key)!r}); resume with the data.* settings "
                    f"it was trained with, or {init_hint}"
                )
    changes = []
    saved_train = record.get("train_config", {})
    now_train = train_record(cfg, dp_size)
    for key, saved in saved_train.items():
        if key not in now_train or now_train[key] == saved:
            continue
        if key == "global_batch":
            batch = (
                f"train.micro_batch_size={cfg.train.micro_batch_size} x train.grad_accum={cfg.train.grad_accum} x "
                f"{dp_size} data-parallel ranks"
            )
            if set(BATCH_KEYS) & set(cfg.train.resume_override):
                changes.append(f"global batch: {saved} -> {now_train[key]} sequences ({batch}; train.resume_override)")
                continue
            raise PipelineError(
                f"the global batch is {now_train[key]} sequences ({batch}), but checkpoint {where} was trained with "
                f"{saved}; keep it (e.g. on half the ranks, double train.grad_accum), or to change it from here on "
                f"add train.resume_override=[train.grad_accum], or {init_hint}"
            )
        if key in cfg.train.resume_override:
            changes.append(f"{key}: {saved!r} -> {now_train[key]!r} (train.resume_override)")
            continue
        allowed = (
            f"to change it from here on, add train.resume_override=[{key}]"
            if key in RESUME_OVERRIDABLE
            else "it cannot change within a run"
        )
        raise PipelineError(
            f"{key}={now_train[key]!r}, but checkpoint {where} was trained with {key}={saved!r}; {allowed}, or "
            f"{init_hint}"
        )
    return changes


def apply_overrides(optimizer, scheduler, cfg: Config) -> None:
    """After loading a checkpoint: put the overridden optimizer settings into the restored optimizer and schedule
    (the checkpoint's own values would otherwise win). The schedule's shape (warm-up, floor) is read from the
    config at every step already; ``train.grad_clip``, batch sizes and precision come from the new config."""
    tcfg, overridden = cfg.train, set(cfg.train.resume_override)
    if "train.lr" in overridden:
        scheduler.base_lrs = [tcfg.lr for _ in scheduler.base_lrs]
    multiplier = lr_multiplier(scheduler.last_epoch, tcfg.warmup_steps, tcfg.max_steps, tcfg.min_lr_ratio)
    for index, group in enumerate(optimizer.param_groups):
        group["initial_lr"] = scheduler.base_lrs[index]
        group["lr"] = scheduler.base_lrs[index] * multiplier
        if "train.weight_decay" in overridden and index == 0:  # build_optimizer's first group is the decayed one
            group["weight_decay"] = tcfg.weight_decay
        if overridden & {"train.beta1", "train.beta2"}:
            group["betas"] = (tcfg.beta1, tcfg.beta2)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
