"""The model's weights on disk: the consolidated file a finished run writes, and the weights inside one DeepSpeed
checkpoint. What the evaluation stage (and any later user of a run) loads.

``<run_dir>/checkpoints/model.safetensors`` with ``model_config.json`` holds the final model (gathered from
ZeRO-3 partitions when needed); a checkpoint ``step_NNNNNNNN/`` holds DeepSpeed's files and, in its
``complete.json``, the model config, so a run still training can be evaluated.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from pretrain.config import ModelConfig
from pretrain.errors import ConfigError, PipelineError
from pretrain.model.bloom import from_bloom_state_dict, model_config_from_bloom
from pretrain.model.positions import is_absolute
from pretrain.parallel.distributed import DistContext
from pretrain.run_files import file_sha256, write_atomic
from pretrain.train.checkpoint import COMPLETE, TAG_PATTERN, allowed_globals, check_pickles, complete_tags
from pretrain.train.integrity import nonfinite_tensors, verify_checksums

WEIGHTS = "model.safetensors"
# ``sha256sum``'s format: "<hex>  model.safetensors"; checked before the weights are read.
WEIGHTS_CHECKSUM = "model.safetensors.sha256"


MODEL_CONFIG = "model_config.json"
# In model_config.json beside the model's keys: the SHA-256 of the sentencepiece model the weights were trained with
# (also in a checkpoint's complete.json); export and train.init_from compare it with the tokenizer they are given.
TOKENIZER_SHA256 = "tokenizer_sha256"
# In model.safetensors' metadata: the model config the tensors were saved with, checked against model_config.json.
CONFIG_METADATA = "model_config"


def saved_model_config(values: dict) -> ModelConfig:
    """The ``ModelConfig`` a run recorded. A record without ``embed_scale`` predates the key: its absolute encodings
    were trained with tokens and positions added unscaled (1.0), not with today's default (model/positions.py)."""
    values = {k: v for k, v in values.items() if k != TOKENIZER_SHA256}
    if "embed_scale" not in values and is_absolute(values.get("pos_encoding", "alibi")):
        values = {**values, "embed_scale": 1.0}
    return ModelConfig(**values)


def read_model_config(path: Path) -> ModelConfig:
    """``saved_model_config`` of a ``model_config.json``; one line naming the file when it cannot be one."""
    try:
        values = json.loads(Path(path).read_text())
        if not isinstance(values, dict):
            raise ValueError("not a JSON object")
        return saved_model_config(values)
    except (OSError, ValueError, TypeError, ConfigError) as err:
        raise PipelineError(f"{path} is not a usable model config ({type(err).__name__}: {err})") from None


def recorded_tokenizer_sha256(weights_dir: Path) -> str | None:
    """The SHA-256 of the tokenizer the weights in ``weights_dir`` (final weights, or one checkpoint) were trained
    with, as training recorded it; None for weights saved before it was recorded."""
    weights_dir = Path(weights_dir)
    record = weights_dir / COMPLETE if is_checkpoint(weights_dir) else weights_dir / MODEL_CONFIG
    try:
        value = json.loads(record.read_text()).get(TOKENIZER_SHA256)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def save_weights(
    model: torch.nn.Module,
    model_cfg: ModelConfig,
    directory: Path,
    ctx: DistContext,
    zero_stage: int,
    tokenizer_sha256: str | None = None,
):
    """Write ``model.safetensors`` (with the model config in its metadata) and ``model_config.json`` (with
    ``tokenizer_sha256``, the tokenizer trained with), gathering ZeRO-3 partitions first. All ranks call."""
    from safetensors.torch import save_file

    params = list(model.parameters())
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if ctx.is_main else None
    else:
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if ctx.is_main else None
    if ctx.is_main:
        bad = nonfinite_tensors(state)
        if bad:
            raise PipelineError(f"not writing {directory / WEIGHTS}: {bad[0]} holds NaN or infinity")
        directory.mkdir(parents=True, exist_ok=True)
        # Through a temporary file: a reader, or a crash, sees the old weights or the new ones.
        tmp = directory / f".{WEIGHTS}.tmp"
        metadata = {"format": "pt", CONFIG_METADATA: json.dumps(asdict(model_cfg))}
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
        digest = file_sha256(tmp)
        os.replace(tmp, directory / WEIGHTS)
        write_atomic(directory / WEIGHTS_CHECKSUM, f"{digest}  {WEIGHTS}\n")
        record = asdict(model_cfg) | ({TOKENIZER_SHA256: tokenizer_sha256} if tokenizer_sha256 else {})
        write_atomic(directory / MODEL_CONFIG, json.dumps(record, indent=2))
    ctx.barrier()
    return directory / WEIGHTS


def load_weights(directory: Path) -> tuple[ModelConfig, dict]:
    """``(ModelConfig, state_dict)`` from a directory written by ``save_weights``, or from one DeepSpeed checkpoint
    (``step_NNNNNNNN``, see ``load_checkpoint_weights``)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if is_checkpoint(directory):
        return load_checkpoint_weights(directory)
    if not (directory / WEIGHTS).exists():
        raise PipelineError(f"no {WEIGHTS} in {directory}: train the model first (stage=train)")
    cfg = read_model_config(directory / MODEL_CONFIG)
    path = directory / WEIGHTS
    checksum = directory / WEIGHTS_CHECKSUM
    if not checksum.is_file():
        # The train stage writes it beside every model.safetensors: without it an edit or a torn copy goes unseen.
        raise PipelineError(
            f"{path} has no checksum file {checksum.name} beside it, so the weights cannot be verified: copy it with "
            f"the weights, or, if these weights are yours as they are, write it: "
            f"(cd {directory} && sha256sum {WEIGHTS} > {WEIGHTS_CHECKSUM})"
        )
    if file_sha256(path) != checksum.read_text().split()[0]:
        raise PipelineError(f"{path} does not match its checksum in {checksum.name} (corrupt or truncated)")
    try:
        state = load_file(str(path))
        metadata = _metadata(path)
    except Exception as err:  # safetensors' own error types
        raise PipelineError(f"{path} cannot be read ({type(err).__name__}: {err})") from None
    check_config_matches(cfg, state, directory / MODEL_CONFIG, metadata.get(CONFIG_METADATA))
    return cfg, check_finite(state, path)


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def check_config_matches(cfg: ModelConfig, state: dict, where: Path, saved_with: str | None = None) -> None:
    """One line when the model config ``where`` holds is not the one of the tensors in ``state``: another config
    than the one recorded in the weights file (``saved_with``, JSON; absent before it was recorded), or shapes that
    another model would have (the layers present, the widths, the vocabulary)."""
    if saved_with:
        try:
            recorded = asdict(saved_model_config(json.loads(saved_with)))
        except (ValueError, TypeError, ConfigError):
            recorded = None
        if recorded is not None:
            for key, value in asdict(cfg).items():
                if key in recorded and recorded[key] != value:
                    raise PipelineError(
                        f"{where} says {key}={value!r}, but the weights beside it were saved with "
                        f"{key}={recorded[key]!r}: put back the {MODEL_CONFIG} written with them (or set {key}: "
                        f"{recorded[key]!r} in it)"
                    )
    from pretrain.model.gpt import GPT

    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in GPT(cfg).state_dict().items()}
    for name, shape in expected.items():
        there = tuple(state[name].shape) if name in state else None
        if there != shape:
            raise PipelineError(
                f"{where} describes a model ({_shape(cfg)}) whose weight {name} is {shape}, but the weights beside it "
                f"hold {there or 'no such tensor'}: the config is not the one these weights were saved with"
            )
    extra = sorted(set(state) - set(expected))
    if extra:
        raise PipelineError(
            f"{where} describes a model ({_shape(cfg)}) without weight {extra[0]}, which the weights beside it hold "
            f"({len(extra)} such): the config is not the one these weights were saved with"
        )


def check_finite(state: dict, where: Path) -> dict:
    """``state`` itself, or a PipelineError naming the first tensor that holds NaN or infinity."""
    bad = nonfinite_tensors(state)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise PipelineError(f"{where}: weight {bad[0]}{more} holds NaN or infinity; these weights cannot be used")
    return state


def model_config(directory: Path) -> ModelConfig:
    """The ``ModelConfig`` of the weights ``load_weights(directory)`` reads, without loading them."""
    directory = Path(directory)
    if is_checkpoint(directory):
        return checkpoint_model_config(directory)
    return read_model_config(directory / MODEL_CONFIG)


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is one DeepSpeed checkpoint directory: a ``step_NNNNNNNN`` one (complete or not) or any with
    ``complete.json`` (a universal copy)."""
    path = Path(path)
    return path.is_dir() and (TAG_PATTERN.fullmatch(path.name) is not None or (path / COMPLETE).is_file())


def checkpoint_model_config(step_dir: Path, where: str | None = None) -> ModelConfig:
    """The model config recorded in a complete checkpoint's ``complete.json``.

    Raises a PipelineError that starts with ``where`` (the setting that named the directory) and says what to
    pass instead for an unfinished save, a universal copy, or a checkpoint saved before the config was recorded.
    """
    step_dir = Path(step_dir)
    where = where or f"checkpoint {step_dir}"
    if step_dir.name.endswith("_universal"):
        original = step_dir.with_name(step_dir.name.removesuffix("_universal"))
        raise PipelineError(
            f"{where} is a universal copy made to resume on another number of ranks; evaluate the checkpoint "
            f"it was made from: {original}"
        )
    if not (step_dir / COMPLETE).is_file():
        raise PipelineError(
            f"{where}: checkpoint {step_dir.name} is incomplete (no {COMPLETE}: its save did not finish, or is "
            f"still running); {_complete_neighbours(step_dir)}"
        )
    record = json.loads((step_dir / COMPLETE).read_text())
    if "model_config" not in record:
        raise PipelineError(
            f"{where}: checkpoint {step_dir.name} was saved before checkpoints recorded their model config (its "
            f"{COMPLETE} has no 'model_config' entry), so its shapes are unknown. Evaluate the run's final weights "
            f"instead (eval.checkpoint={step_dir.parent}), or record the config by hand: put the object in "
            f"{step_dir.parent / MODEL_CONFIG} (written when the run finished; otherwise the run's model.* settings "
            f"with the tokenizer's vocab_size) under 'model_config' in {step_dir / COMPLETE}"
        )
    return saved_model_config(record["model_config"])


def _complete_neighbours(step_dir: Path) -> str:
    """What to pass instead of an incomplete checkpoint: the complete ones just older and just newer."""
    tags = complete_tags(step_dir.parent)
    older = [t for t in tags if t < step_dir.name][-1:]
    newer = [t for t in tags if t > step_dir.name][:1]
    if not tags:
        return f"{step_dir.parent} holds no complete checkpoint yet: wait for the next save, or train further"
    named = [f"{step_dir.parent / t} (older)" for t in older] + [f"{step_dir.parent / t} (newer)" for t in newer]
    return f"pass a complete one: {' or '.join(named)}"


def load_checkpoint_weights(step_dir: Path) -> tuple[ModelConfig, dict]:
    """``(ModelConfig, float32 state_dict of GPT)`` from one complete DeepSpeed checkpoint ``<checkpoints>/<tag>``.

    ZeRO-1/2/3 keep the float32 master weights partitioned in the ranks' ``*_optim_states.pt``: DeepSpeed's own
    reader joins them (for ZeRO-3 the model states hold only placeholders). ZeRO-0 writes no optimizer
    partitions (DeepSpeed's reader fails on it) but the whole module in ``mp_rank_00_model_states.pt``: in the
    training dtype, so a bf16/fp16 ZeRO-0 run gives its 16-bit weights, as its final model.safetensors does.
    The names are ``GPT``'s: DeepSpeed saves ``engine.module``'s state dict (no ``module.`` prefix), and the
    tied LM head is the word embedding itself, so no duplicate entry appears.
    """
    step_dir = Path(step_dir)
    cfg = checkpoint_model_config(step_dir)
    problem = verify_checksums(step_dir, json.loads((step_dir / COMPLETE).read_text()).get("checksums"))
    if problem:
        raise PipelineError(problem)
    check_pickles(step_dir)  # DeepSpeed's ZeRO reader unpickles with full pickle
    if any(step_dir.glob("*_optim_states.pt")):
        state = _zero_master_weights(step_dir)
    else:
        state = _module_weights(step_dir)
    return cfg, check_finite({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, step_dir)


def _zero_master_weights(step_dir: Path) -> dict:
    """The float32 weights joined from a ZeRO-1/2/3 checkpoint's partitions by DeepSpeed's zero_to_fp32."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # It prints its progress to stdout and stderr: kept off the eval stage's console (and out of its errors'
    # way: a missing partition still raises).
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            return get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
        except (FileNotFoundError, ValueError) as err:
            raise PipelineError(f"could not read the ZeRO partitions of checkpoint {step_dir}: {err}") from None


def _module_weights(step_dir: Path) -> dict:
    """The whole module's state dict that a ZeRO-0 checkpoint keeps in ``mp_rank_00_model_states.pt``."""
    path = step_dir / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise PipelineError(f"checkpoint {step_dir} holds neither ZeRO partitions nor {path.name}")
    # mmap: the file also holds the optimizer's moments (twice the weights), which are never read.
    with torch.serialization.safe_globals(allowed_globals()):
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)["module"]


def _init_source(path: Path) -> tuple[ModelConfig, dict, Path | None, Path]:
    """``(ModelConfig, state_dict, the directory whose tokenizer they go with or None, the weights' directory)`` of
    what ``train.init_from`` names: a run directory (its ``tokenizer/spm.model``), or an exported ``hf/`` (its
    ``tokenizer.json``, and the run it is in). Non-float tensors keep their dtype (``check_float`` refuses them)."""
    from safetensors.torch import load_file

    key = f"train.init_from={str(path)!r}"
    if path.is_file() and path.name == WEIGHTS:
        path = path.parent
    if not path.is_dir():
        raise PipelineError(f"{key}: no such directory (give a run directory, a checkpoint or an exported hf/)")
    if (path / "config.json").is_file() and (path / WEIGHTS).is_file():  # an exported (or any) BLOOM model
        try:
            cfg = model_config_from_bloom(json.loads((path / "config.json").read_text()))
            state = from_bloom_state_dict(load_file(str(path / WEIGHTS)))
        except (ConfigError, ValueError) as err:
            raise PipelineError(f"{key}: {err}") from None
        except Exception as err:  # safetensors' own error types
            raise PipelineError(f"{key}: {path / WEIGHTS} cannot be read ({type(err).__name__}: {err})") from None
        check_float(state, path / WEIGHTS, key)
        return cfg, check_finite({k: v.float() for k, v in state.items()}, path), path, path
    if (path / "checkpoints").is_dir():  # a run directory
        run_dir, path = path, path / "checkpoints"
    else:
        run_dir = path.parent.parent if is_checkpoint(path) else path.parent
    if not (path / WEIGHTS).is_file() and not is_checkpoint(path):
        tags = complete_tags(path)
        if not tags:
            raise PipelineError(f"{key}: {path} holds neither {WEIGHTS} nor a complete checkpoint")
        path = path / tags[-1]
    cfg, state = load_weights(path)
    return cfg, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, run_dir, path


def load_init_weights(model: torch.nn.Module, init_from: str, tokenizer: Path) -> str:
    """Load the weights ``train.init_from`` names into ``model`` (a new run: no optimizer state, schedule or data
    position is taken); return a line saying what was loaded. Shapes must match: PipelineError naming both models.
    A run directory's tokenizer must be ``tokenizer``'s."""
    saved_cfg, state, run_dir, weights_dir = _init_source(Path(init_from))
    key = f"train.init_from={init_from!r}"
    check_float(state, weights_dir, key)
    check_init_tokenizer(weights_dir, run_dir, Path(tokenizer), key)
    ours = model.state_dict()
    now = model.cfg
    # Same shapes, other functions: tanh-GELU and GELU weights fit each other, and so do norms with zero biases.
    for name in INIT_FUNCTION_KEYS:
        if getattr(saved_cfg, name) != getattr(now, name):
            raise PipelineError(
                f"{key} holds a model with model.{name}={getattr(saved_cfg, name)}, this run's has "
                f"model.{name}={getattr(now, name)}; weights trained for one do not compute the other: set "
                f"model.{name}={getattr(saved_cfg, name)} to start from them"
            )
    for name, tensor in ours.items():
        if name not in state or tuple(state[name].shape) != tuple(tensor.shape):
            there = tuple(state[name].shape) if name in state else "absent"
            raise PipelineError(
                f"{key} holds a model of {_shape(saved_cfg)}, this run's is {_shape(now)}: weight {name} is {there} "
                f"there and {tuple(tensor.shape)} here; the model.* shape must match to start from these weights"
            )
    model.load_state_dict({name: state[name].to(ours[name].dtype) for name in ours})
    note = f"initialised from {init_from} ({_shape(saved_cfg)}, trained at seq_len {saved_cfg.seq_len})"
    if saved_cfg.pos_encoding != now.pos_encoding:
        note += f"; note: its positions were {saved_cfg.pos_encoding}, this run's are {now.pos_encoding}"
    return note + "; the optimizer, schedule and data start fresh"


# Model keys that change what the weights compute without always changing their shapes (train.init_from compares them).
INIT_FUNCTION_KEYS = ("n_kv_head", "mlp", "norm", "alibi_slopes", "parallel_block")


def check_float(state: dict, where: Path, key: str) -> None:
    """One line naming the first tensor that is not floating point (quantized or edited weights): casting it to
    float would train from numbers that are not the weights."""
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            raise PipelineError(
                f"{key}: weight {name} in {where} is {str(tensor.dtype).removeprefix('torch.')}, not floating point "
                "(quantized or edited weights); give weights as training or the export wrote them (fp32, bf16 or fp16)"
            )


def check_init_tokenizer(weights_dir: Path, source_dir: Path | None, tokenizer: Path, key: str) -> None:
    """The tokenizer of the weights ``train.init_from`` names must be ``tokenizer``, whichever kind of path names
    them: the hash training recorded with them, their run's ``tokenizer/spm.model``, an exported ``tokenizer.json``'s
    vocabulary and the run the export is in. PipelineError in one line."""
    hint = "its token ids would mean other pieces here: use the data.* settings (or data.tokenizer) it was trained with"
    ours = tokenizer.read_bytes()
    recorded = recorded_tokenizer_sha256(weights_dir)
    if recorded and recorded != file_sha256(tokenizer):
        raise PipelineError(
            f"{key} was trained with another tokenizer (SHA-256 {recorded[:12]}..., recorded with the weights) "
            f"than these data.* settings give ({tokenizer}, {file_sha256(tokenizer)[:12]}...); {hint}"
        )
    if source_dir is None:
        return
    export = (source_dir / "config.json").is_file() and not (source_dir / MODEL_CONFIG).is_file()  # an hf/
    theirs = (source_dir.parent if export else source_dir) / "tokenizer" / "spm.model"  # the run's
    if theirs.is_file() and theirs.read_bytes() != ours:
        raise PipelineError(
            f"{key} was trained with another tokenizer ({theirs}) than these data.* settings give; {hint}"
        )
    theirs = source_dir / "tokenizer.json"
    if export and theirs.is_file() and (difference := _vocabulary_difference(theirs, ours)):
        raise PipelineError(f"{key} comes with another tokenizer ({theirs}: {difference}) than {tokenizer}; {hint}")


def _vocabulary_difference(tokenizer_json: Path, spm_model: bytes) -> str | None:
    """How an exported ``tokenizer.json``'s vocabulary differs from a sentencepiece model's pieces (the id of each
    piece), or None when they agree."""
    import sentencepiece as spm

    try:
        vocab = json.loads(tokenizer_json.read_text(encoding="utf-8"))["model"]["vocab"]
        sp = spm.SentencePieceProcessor(model_proto=spm_model)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        return f"cannot be compared ({type(err).__name__}: {err})"
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    if isinstance(vocab, list):  # a unigram model: [[piece, score], ...]
        vocab = {entry[0]: i for i, entry in enumerate(vocab)}
    if len(vocab) != len(pieces):
        return f"{len(vocab)} pieces, this tokenizer has {len(pieces)}"
    for i, piece in enumerate(pieces):
        if vocab.get(piece) != i:
            return f"id {i} is {next((p for p, j in vocab.items() if j == i), None)!r} there, {piece!r} here"
    return None


def _shape(cfg: ModelConfig) -> str:
    kv = f", n_kv_head={cfg.n_kv_head}" if cfg.n_kv_head != cfg.n_head else ""
    mlp = f", mlp={cfg.mlp}" if cfg.mlp != "gelu_tanh" else ""
    return f"n_layer={cfg.n_layer}, n_head={cfg.n_head}{kv}, d_model={cfg.d_model}{mlp}, vocabulary {cfg.vocab_size}"
