"""Structured configuration: one dataclass per Hydra config group, registered in Hydra's ConfigStore.

Types and defaults live here, so a misspelt key or a value of the wrong type fails when Hydra composes the
config. Checks that span fields (``d_model % n_head``) run in ``__post_init__``, which Hydra does not call on
composition: ``pretrain.__main__`` converts the composed config with ``OmegaConf.to_object`` first thing,
which builds these dataclasses and runs the checks before any work starts.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from pretrain.errors import ConfigError

POS_ENCODINGS = ("alibi", "sinusoidal", "learned", "rope", "none")
ATTENTION_BACKENDS = ("fused", "sdpa", "eager")
# model.mlp: BLOOM's tanh-approximated GELU (the default), the exact GELU (MPT), SwiGLU (Jais, BTLM, LLaMA).
MLPS = ("gelu_tanh", "gelu", "swiglu")
# model.norm: LayerNorm with a bias (BLOOM), or without one (MPT); null follows model.bias.
NORMS = ("layernorm", "layernorm_nobias")
# model.alibi_slopes: the paper's slopes (BLOOM, MPT), or Falcon's: rounded to bfloat16 and divided by sqrt(head_dim),
# as Falcon adds its bias before the 1/sqrt(head_dim) scaling of the scores (transformers' FalconModel, Falcon-RW).
ALIBI_SLOPES = ("paper", "falcon")
# SwiGLU's hidden size is rounded up to a multiple of this (LLaMA's multiple_of; torchtitan and litgpt use it too).
SWIGLU_MULTIPLE = 256
# `all` is prepare -> train -> eval -> export; `eval` also runs prepare first (a cache hit that gives the validation
# split).
STAGES = ("all", "prepare", "train", "eval", "export", "generate", "harness")
# harness.batch_size: a whole number, or lm-eval's search for the largest batch that fits (auto, auto:N re-searches N
# times as the inputs get shorter).
HARNESS_AUTO_BATCH = re.compile(r"auto(:[1-9][0-9]*)?")
EXPORT_DTYPES = ("fp32", "bf16", "fp16")
EXPORT_FORMATS = ("auto", "bloom", "mpt", "falcon")
# eval.windows: cut from the concatenated validation stream, or only inside one validation document.
EVAL_WINDOWS = ("stream", "documents")
# The train.* keys that shape the optimization a checkpoint continues: on resume they must equal the checkpoint's
# unless train.resume_override names them. The schedule's length (train.max_steps) may always change: raising it is
# how a finished run is extended.
RESUME_OVERRIDABLE = (
    "train.lr",
    "train.min_lr_ratio",
    "train.warmup_steps",
    "train.weight_decay",
    "train.beta1",
    "train.beta2",
    "train.grad_clip",
    "train.micro_batch_size",
    "train.grad_accum",
    # What attention sees of a packed window: a change applies from the resumed step on (the data stream is the same).
    "train.document_mask",
)
DATA_SOURCES = ("stdlib", "files", "hf", "mix")
# What one source of a data=mix mixture may be (data.sources[i].kind), and the keys a source takes.
SOURCE_KINDS = ("stdlib", "files", "hf")
SOURCE_KEYS = (
    "kind",
    "weight",
    "label",
    "paths",
    "name",
    "config",
    "split",
    "streaming",
    "data_files",
    "text_field",
    "max_files",
    "max_documents",
)


PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def resolve_precision(precision: str, device_type: str, bf16_supported: bool = False, saved: str | None = None) -> str:
    """``train.precision`` as a run uses it: ``auto`` is the resumed checkpoint's precision (``saved``), else bf16
    on a CUDA device that supports it, else fp32 (so the default CPU run is the fp32 run it always was)."""
    if precision != "auto":
        return precision
    if saved is not None:
        return saved
    return "bf16" if device_type == "cuda" and bf16_supported else "fp32"


def check_choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def check_positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}={value!r} is not allowed; it must be {bound}")


def select_multiple(select: str) -> int | None:
    """``eval.select``: None for ``last``, K for ``best_at:K``; ConfigError otherwise."""
    if select == "last":
        return None
    kind, _, multiple = str(select).partition(":")
    if kind == "best_at" and multiple.isdigit() and int(multiple) >= 1:
        return int(multiple)
    raise ConfigError(
        f"eval.select={select!r} is not allowed; give last, or best_at:K for the checkpoint with the lowest "
        "validation perplexity at K x model.seq_len (e.g. best_at:4)"
    )


def parse_time_limit(value: str | None) -> float | None:
    """``train.time_limit`` "HH:MM" (or "HH:MM:SS") as seconds; None for no limit."""
    if value is None:
        return None
    parts = str(value).split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        numbers = [int(p) for p in parts] + [0] * (3 - len(parts))
    except ValueError:
        raise ConfigError(f"train.time_limit={value!r} is not allowed; write HH:MM or HH:MM:SS") from None
    hours, minutes, seconds = numbers
    return float(hours * 3600 + minutes * 60 + seconds)


@dataclass
class ModelConfig:
    """The GPT's shape. The defaults follow Hugging Face's ``BloomForCausalLM`` layout, so export is exact."""

    n_layer: int = 2
    n_head: int = 4
    d_model: int = 128
    seq_len: int = 128
    vocab_size: int = 8192  # replaced by the tokenizer's size when a prepared corpus is trained on
    pos_encoding: str = "alibi"
    attention: str = "fused"
    mlp_ratio: int = 4
    dropout: float = 0.0
    bias: bool = True
    # BLOOM normalises the word embeddings before the first block; GPT-2/nanoGPT do not.
    embedding_layernorm: bool = True
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    # Rows of the learned position table (pos_encoding=learned); null means seq_len.
    max_positions: Optional[int] = None
    rope_base: float = 10000.0
    # Absolute encodings only (sinusoidal, learned): token embeddings count this many times their positions before
    # the embedding LayerNorm (applied as positions / embed_scale). null: the ALiBi paper's baselines' ratio
    # (1/init_std for sinusoidal, sqrt(d_model) for learned; see docs/eval.md); 1: the unscaled sum.
    embed_scale: Optional[float] = None
    # Key/value heads, shared by groups of n_head / n_kv_head query heads (grouped-query attention; 1: multi-query).
    # null: n_head (every query head has its own). ALiBi slopes stay per query head.
    n_kv_head: Optional[int] = None
    mlp: str = "gelu_tanh"
    # SwiGLU only: the hidden size; null: 2/3 of mlp_ratio x d_model, rounded up to a multiple of 256 (LLaMA's rule).
    mlp_hidden: Optional[int] = None
    # null: layernorm when model.bias is true, layernorm_nobias when it is false (what model.bias=false always meant).
    norm: Optional[str] = None
    alibi_slopes: str = "paper"
    # Attention and MLP side by side on the same input, each through its own LayerNorm (GPT-J, PaLM, Falcon-40B's
    # new_decoder_architecture) instead of one after the other; the same parameters.
    parallel_block: bool = False

    def __post_init__(self) -> None:
        for key in ("n_layer", "n_head", "d_model", "seq_len", "vocab_size", "mlp_ratio"):
            check_positive(f"model.{key}", getattr(self, key))
        if self.d_model % self.n_head:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}; "
                "choose a head count that divides d_model"
            )
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if not isinstance(self.n_kv_head, int) or self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ConfigError(
                f"model.n_kv_head={self.n_kv_head} does not divide model.n_head={self.n_head}; each key/value head "
                f"serves an equal group of query heads: choose a divisor of {self.n_head} (1 = multi-query)"
            )
        check_choice("model.mlp", self.mlp, MLPS)
        if self.mlp_hidden is not None:
            if self.mlp != "swiglu":
                raise ConfigError(
                    f"model.mlp_hidden={self.mlp_hidden} is for model.mlp=swiglu (model.mlp={self.mlp}); the GELU "
                    "MLPs are model.mlp_ratio x d_model wide"
                )
            check_positive("model.mlp_hidden", self.mlp_hidden)
        if self.norm is None:
            self.norm = "layernorm" if self.bias else "layernorm_nobias"
        check_choice("model.norm", self.norm, NORMS)
        check_choice("model.alibi_slopes", self.alibi_slopes, ALIBI_SLOPES)
        check_choice("model.pos_encoding", self.pos_encoding, POS_ENCODINGS)
        check_choice("model.attention", self.attention, ATTENTION_BACKENDS)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout!r} is not allowed; it must be in [0, 1)")
        if self.pos_encoding == "rope" and (self.d_model // self.n_head) % 2:
            raise ConfigError(
                f"model.pos_encoding=rope needs an even head dimension; d_model/n_head = {self.d_model // self.n_head}"
            )
        if self.max_positions is not None:
            check_positive("model.max_positions", self.max_positions)
        if self.embed_scale is not None:
            check_positive("model.embed_scale", self.embed_scale)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def mlp_width(self) -> int:
        """The MLP's hidden size: ``mlp_ratio x d_model`` for GELU; for SwiGLU ``mlp_hidden``, else 2/3 of that
        rounded up to a multiple of ``SWIGLU_MULTIPLE`` (its three matrices then hold about the GELU MLP's two)."""
        if self.mlp != "swiglu":
            return self.mlp_ratio * self.d_model
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return SWIGLU_MULTIPLE * math.ceil(2 * self.mlp_ratio * self.d_model / 3 / SWIGLU_MULTIPLE)

    @property
    def norm_bias(self) -> bool:
        return self.norm == "layernorm"


@dataclass
class SlurmConfig:
    """``data.slurm.*``: the array job that runs prepare's work units under ``data.executor=slurm``."""

    partition: Optional[str] = None
    time: str = "04:00:00"
    cpus_per_task: int = 1
    mem_per_cpu_gb: int = 2
    qos: Optional[str] = None
    job_name: str = "pretrain-prepare"
    # Shell lines run before each task (e.g. "source .venv/bin/activate").
    env_command: Optional[str] = None
    # Other sbatch options, e.g. {account: myproject}.
    sbatch_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class SourceConfig:
    """One entry of ``data.sources`` (``data=mix``): a corpus of its own and its weight in the mixture.

    The keys are DataConfig's source keys (``name`` is the dataset of a ``kind: hf`` source), plus ``weight`` (relative
    to the other sources' weights, >= 0; a source of weight 0 is prepared and validated but never trained on) and
    ``label``, the source's name in the prepared corpus, ``train/val.jsonl`` and wandb (default: its kind, or the
    dataset's name; ``<kind>-<index>`` when two sources would share it)."""

    kind: str
    weight: float
    label: str
    paths: list[str] = field(default_factory=list)
    name: Optional[str] = None
    config: Optional[str] = None
    split: str = "train"
    streaming: bool = False
    data_files: list[str] = field(default_factory=list)
    text_field: str = "text"
    max_files: Optional[int] = None
    max_documents: Optional[int] = None

    def as_data(self, data: DataConfig) -> DataConfig:
        """This source as single-source ``data.*`` settings (the mixture's split and tokenizer settings)."""
        own = {key: getattr(self, key) for key in SOURCE_KEYS if key not in ("kind", "weight", "label")}
        return replace(data, source=self.kind, sources=[], **own)


def parse_sources(entries: list) -> list[SourceConfig]:
    """``data.sources`` (mappings from the command line or a YAML file) as SourceConfig entries, every problem one
    ConfigError naming the entry and key (the schema takes plain mappings so that these messages are one line)."""
    if not entries:
        raise ConfigError(
            "data=mix needs data.sources=[{kind: stdlib|files|hf, ..., weight: W}, ...]; see docs/prepare.md"
        )
    sources = []
    for index, entry in enumerate(entries):
        where = f"data.sources[{index}]"
        if isinstance(entry, SourceConfig):
            entry = {key: getattr(entry, key) for key in SOURCE_KEYS}
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where}={entry!r}: a source is a mapping like {{kind: files, paths: [...], weight: 1}}")
        entry = dict(entry)
        unknown = [key for key in entry if key not in SOURCE_KEYS]
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), SOURCE_KEYS, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            keys = ", ".join(SOURCE_KEYS)
            raise ConfigError(f"{where} has an unknown key {unknown[0]!r}; {hint}a source's keys: {keys}")
        kind = entry.get("kind")
        if kind is None:
            raise ConfigError(f"{where} has no kind; give kind: {', '.join(SOURCE_KINDS)}")
        check_choice(f"{where}.kind", kind, SOURCE_KINDS)
        weight = entry.get("weight")
        if weight is None:
            raise ConfigError(f"{where} ({kind}) has no weight; give weight: W (its share relative to the others)")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ConfigError(
                f"{where}.weight={weight!r} is not allowed; a weight is a number >= 0, relative to the other sources'"
            )
        for key in ("paths", "data_files"):
            if isinstance(entry.get(key), str):
                entry[key] = [entry[key]]
        for key, value in entry.items():
            _check_source_value(f"{where}.{key}", key, value)
        given = {key: value for key, value in entry.items() if value is not None and key not in ("kind", "weight")}
        source = SourceConfig(kind=kind, weight=float(weight), **{"label": "", **given})
        if kind == "files" and not source.paths:
            raise ConfigError(f"{where} (files) needs paths: [GLOB, ...] naming .txt, .jsonl or .parquet files")
        if kind == "hf" and not source.name:
            raise ConfigError(f"{where} (hf) needs name: DATASET (a hub name, or a local loader such as json)")
        foreign = [key for key in ("paths",) if kind != "files" and entry.get(key)]
        foreign += [key for key in ("name", "config", "data_files", "streaming") if kind != "hf" and entry.get(key)]
        foreign += ["max_files"] if kind == "hf" and entry.get("max_files") is not None else []
        if foreign:
            raise ConfigError(f"{where}.{foreign[0]} is not a key of a {kind} source; see docs/prepare.md")
        sources.append(source)
    if not any(source.weight > 0 for source in sources):
        raise ConfigError("data.sources: every weight is 0; give at least one source a weight > 0")
    defaults = [source.label or _default_label(source) for source in sources]
    for index, source in enumerate(sources):
        if not source.label:
            source.label = defaults[index] if defaults.count(defaults[index]) == 1 else f"{defaults[index]}-{index}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", source.label):
            raise ConfigError(
                f"data.sources[{index}].label={source.label!r} is not allowed; use letters, digits, '.', '_' and '-'"
            )
    labels = [source.label for source in sources]
    twice = [label for label in labels if labels.count(label) > 1]
    if twice:
        raise ConfigError(f"data.sources: two sources are labelled {twice[0]!r}; give each a label of its own")
    return sources


def _check_source_value(key: str, name: str, value: Any) -> None:
    if value is None or name in ("kind", "weight"):
        return
    if name in ("paths", "data_files"):
        ok = isinstance(value, (list, tuple)) and all(isinstance(item, str) and item for item in value)
        want = "a list of paths or globs"
    elif name in ("max_files", "max_documents"):
        ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
        want = "a whole number > 0 (or null)"
    elif name == "streaming":
        ok, want = isinstance(value, bool), "true or false"
    else:
        ok, want = isinstance(value, str) and bool(value), "a non-empty string"
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed; give {want}")


def _default_label(source: SourceConfig) -> str:
    if source.kind != "hf":
        return source.kind
    tail = str(source.name).rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_.-]", "-", tail).lstrip("-._") or "hf"


@dataclass
class DataConfig:
    """Which corpus to prepare and how to tokenize it (``data=stdlib|files|hf``); see ``docs/prepare.md``."""

    source: str = "stdlib"
    # data=files: globs of .txt (one document per file), .jsonl/.json and .parquet files (one per row).
    paths: list[str] = field(default_factory=list)
    # The text column of .jsonl/.parquet files and of hub datasets.
    text_field: str = "text"
    # data=hf: arguments of datasets.load_dataset (name may also be a loader such as json, or a
    # directory written by Dataset.save_to_disk).
    name: Optional[str] = None
    config: Optional[str] = None
    split: str = "train"
    streaming: bool = False
    # data=hf: data files handed to load_dataset (for local loaders: data.name=json data.data_files=[...]).
    data_files: list[str] = field(default_factory=list)
    # Documents taken from the corpus, in order (null: all of it); caps a stream.
    max_documents: Optional[int] = None
    # Files taken from the sorted file list (data=stdlib|files; null: all); for quick runs and tests.
    max_files: Optional[int] = None
    # Documents whose key hashes below this fraction form the validation split.
    val_fraction: float = 0.05
    vocab_size: int = 8192
    # An existing sentencepiece model to use instead of training one (then vocab_size is the model's).
    tokenizer: Optional[str] = None
    tokenizer_type: str = "bpe"
    # Characters of training text sampled to train the tokenizer.
    tokenizer_sample_chars: int = 20_000_000
    # Where prepared corpora land, one directory per fingerprint of the inputs (relative: to the cwd).
    cache_dir: str = "data"
    # Processes of the split pass (files read in parallel, or datasets' map num_proc); threads for tokenizer training.
    num_proc: int = 2
    # Where prepare's work units run: local (data.workers processes here) or slurm (a datatrove array job).
    executor: str = "local"
    # Local processes that tokenize the work units (null: every core this process may use).
    workers: Optional[int] = None
    # Characters of text per work unit (about bytes for mostly-ASCII text). Units are cut by the inputs alone, so
    # any number of workers writes the same shards; one unit is one shard of each split.
    unit_bytes: int = 128 * 2**20
    # data.executor=slurm: array tasks (each takes every data.tasks-th unit) and their sbatch settings.
    tasks: int = 64
    slurm: SlurmConfig = field(default_factory=lambda: SlurmConfig())
    # data=mix: the sources and their weights, e.g. [{kind: stdlib, weight: 0.3}, {kind: files, paths: [long/*.txt],
    # weight: 0.7}] (each entry: SourceConfig's keys); the checks below turn them into SourceConfig entries.
    sources: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_choice("data.source", self.source, DATA_SOURCES)
        if self.source == "mix":
            keys = ("paths", "name", "config", "data_files", "max_files", "max_documents", "streaming")
            moved = [key for key in keys if getattr(self, key) not in (None, [], False)]
            if moved:
                raise ConfigError(f"data.{moved[0]} is not read by data=mix; give it inside a source of data.sources")
            self.sources = parse_sources(self.sources)
        elif self.sources:
            raise ConfigError(f"data.sources is for data=mix (data.source={self.source!r}); add data=mix to mix them")
        check_choice("data.tokenizer_type", self.tokenizer_type, ("bpe", "unigram"))
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction!r} is not allowed; it must be in (0, 1)")
        if self.vocab_size < 260:
            # byte fallback alone takes 256 pieces, plus the special tokens
            raise ConfigError(f"data.vocab_size={self.vocab_size} is not allowed; it must be >= 260")
        check_positive("data.num_proc", self.num_proc)
        check_choice("data.executor", self.executor, ("local", "slurm"))
        if self.workers is not None:
            check_positive("data.workers", self.workers)
        check_positive("data.unit_bytes", self.unit_bytes)
        check_positive("data.tasks", self.tasks)
        check_positive("data.tokenizer_sample_chars", self.tokenizer_sample_chars)
        if self.max_documents is not None:
            check_positive("data.max_documents", self.max_documents)
        if self.max_files is not None:
            check_positive("data.max_files", self.max_files)
        if not self.text_field:
            raise ConfigError("data.text_field must name the column that holds each document's text")
        if self.source == "files" and not self.paths:
            raise ConfigError("data=files needs data.paths=[GLOB, ...] naming .txt, .jsonl or .parquet files")
        if self.source == "hf" and not self.name:
            raise ConfigError("data=hf needs data.name=DATASET (a hub name, or a local loader such as json)")
        if self.data_files and self.source != "hf":
            raise ConfigError(
                f"data.data_files is for data=hf (data.source={self.source!r}); for local files use "
                "data=files data.paths=[GLOB, ...]"
            )
        if self.tokenizer is not None and not self.tokenizer:
            raise ConfigError("data.tokenizer='' is not allowed; give a sentencepiece .model path or null")


@dataclass
class TrainConfig:
    max_steps: int = 500
    micro_batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 1234
    zero_stage: int = 0
    # auto: the checkpoint's precision on resume, else bf16 where the device has it, fp32 on CPU
    # (resolve_precision; the train stage resolves it before anything is recorded). On CUDA, fp32 matmuls use TF32.
    precision: str = "auto"
    activation_checkpointing: bool = False
    # torch.compile the model through DeepSpeed's engine.compile(). Off by default: on a 2-core CPU the
    # compiled tiny model stepped 3x slower than eager (graph breaks around the blockwise kernel).
    compile: bool = False
    ckpt_every: int = 250
    keep_last: int = 2
    resume: str = "auto"
    # Keys of train.* that may differ from the checkpoint's on resume (their new values then apply, and the change
    # is logged); any other difference in a key that shapes the optimization is refused.
    resume_override: list[str] = field(default_factory=list)
    # Weights only, for a new run: a run directory, a DeepSpeed checkpoint or an exported hf/ directory.
    init_from: Optional[str] = None
    # The divergence guard: a step with a non-finite loss or gradient changes no weight; this many in a row stop
    # the run. A finite loss above spike_factor times the recent mean is logged as a spike (0: off).
    max_bad_steps: int = 10
    spike_factor: float = 2.0
    stop_at_step: Optional[int] = None
    time_limit: Optional[str] = None
    eval_every: int = 100
    eval_batches: int = 8
    # Extrapolation watched during training: every eval_every steps, the validation windows at these multiples of
    # model.seq_len ([] turns it off), eval_tokens predictions each, with the windowed control (val/ppl@{k}x).
    eval_lengths: list[int] = field(default_factory=lambda: [1, 2, 4])
    eval_tokens: int = 4096
    # Attention stays inside each document of a packed window (never across </s>). Off by default: the ALiBi paper
    # and GPT-2 train on the plain stream, and the default run stays that run (docs/eval.md).
    document_mask: bool = False
    # [[STEP, LENGTH], ...]: train at LENGTH from after STEP optimizer steps on (first STEP 0, lengths rising), with the
    # tokens per step of model.seq_len (pretrain/train/length_schedule.py). null: model.seq_len throughout.
    seq_len_schedule: Optional[list[Any]] = None
    # Record steps START..END (inclusive) with the PyTorch profiler: <run_dir>/train/profile/ (Chrome/Perfetto JSON).
    profile: Optional[list[int]] = None
    # A metrics row (and the host reads of the loss and gradient norm) every N steps, and at every eval/checkpoint.
    log_every: int = 1
    # Extra DeepSpeed config: a dict merged over the generated one, or a path to a JSON file.
    deepspeed: Any = None
    peak_flops: Optional[float] = None

    def __post_init__(self) -> None:
        for key in ("max_steps", "micro_batch_size", "grad_accum", "ckpt_every", "eval_every", "log_every"):
            check_positive(f"train.{key}", getattr(self, key))
        check_positive("train.lr", self.lr)
        check_positive("train.warmup_steps", self.warmup_steps, allow_zero=True)
        check_positive("train.keep_last", self.keep_last)
        check_positive("train.max_bad_steps", self.max_bad_steps)
        check_positive("train.eval_tokens", self.eval_tokens)
        for multiple in self.eval_lengths:
            if not isinstance(multiple, int) or multiple < 1:
                raise ConfigError(
                    f"train.eval_lengths holds {multiple!r}; give whole multiples of model.seq_len >= 1 "
                    "(e.g. [1, 2, 4]), or [] to turn it off"
                )
        if self.profile is not None and (
            len(self.profile) != 2
            or not all(isinstance(s, int) and s >= 1 for s in self.profile)
            or self.profile[0] > self.profile[1]
        ):
            raise ConfigError(
                f"train.profile={self.profile!r} is not allowed; give [START, END], the first and last step to "
                "record (1 <= START <= END)"
            )
        check_positive("train.spike_factor", self.spike_factor, allow_zero=True)
        if 0 < self.spike_factor <= 1:
            raise ConfigError(
                f"train.spike_factor={self.spike_factor!r} is not allowed; a spike is a loss above this multiple of "
                "the recent mean: give a factor > 1, or 0 to turn spike detection off"
            )
        unknown = [key for key in self.resume_override if key not in RESUME_OVERRIDABLE]
        if unknown:
            raise ConfigError(
                f"train.resume_override holds {unknown[0]!r}; the keys that may change on resume are: "
                f"{', '.join(RESUME_OVERRIDABLE)}"
            )
        if self.init_from is not None and not str(self.init_from).strip():
            raise ConfigError("train.init_from holds an empty path; give a run directory, checkpoint or hf/ export")
        check_schedule_shape(self.seq_len_schedule)
        check_choice("train.zero_stage", self.zero_stage, (0, 1, 2, 3))
        check_choice("train.precision", self.precision, PRECISIONS)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio={self.min_lr_ratio!r} is not allowed; it must be in [0, 1]")
        if self.stop_at_step is not None:
            check_positive("train.stop_at_step", self.stop_at_step)
        parse_time_limit(self.time_limit)

    @property
    def time_limit_s(self) -> float | None:
        """``train.time_limit`` in seconds (None: no limit)."""
        return parse_time_limit(self.time_limit)


@dataclass
class ParallelConfig:
    """Sequence parallelism: each sequence is split over ``sp_size`` ranks (see sequence_parallel.py)."""

    sp_size: int = 1
    sp_mode: str = "ulysses"
    # Ring only: rank r holds chunks r and 2P-1-r of 2P, so every rank does the same causal work.
    zigzag: bool = False

    def __post_init__(self) -> None:
        check_positive("parallel.sp_size", self.sp_size)
        check_choice("parallel.sp_mode", self.sp_mode, ("ulysses", "ring"))


@dataclass
class EvalConfig:
    """The long-context evaluation stage (``stage=eval``); every key is described in ``docs/eval.md``."""

    # Token counts; null means the training length times 1, 2, 4, 8, 16 and 32.
    lengths: Optional[list[int]] = None
    # nonoverlapping: windows of L side by side, every token scored once (the ALiBi paper's protocol).
    # sliding: windows of L moved by `stride`, only the last `stride` predictions of each scored.
    mode: str = "nonoverlapping"
    # stream: windows cut from the concatenated validation split (documents joined by </s>, as in training); each
    # length reports the share of its windows that cross a document boundary. documents: only windows inside one
    # validation document (never across </s>); each length reports the documents and tokens long enough for it.
    windows: str = "stream"
    # eval.mode=sliding only; null means half of each length.
    stride: Optional[int] = None
    # Other run directories evaluated on the same windows (one curve each).
    compare: list[str] = field(default_factory=list)
    # Weights to evaluate instead of <run_dir>/checkpoints: a directory holding model.safetensors, the file, or one
    # DeepSpeed checkpoint <run_dir>/checkpoints/step_NNNNNNNN (any ZeRO stage; a run may still be training).
    checkpoint: Optional[str] = None
    # Which of the run's weights when eval.checkpoint is not given: last (the final model.safetensors), or
    # best_at:K (the kept checkpoint with the lowest validation perplexity at K x model.seq_len, as logged by
    # train.eval_lengths in train/val.jsonl).
    select: str = "last"
    # Predictions scored per length, in whole windows spread evenly over the validation split (null: all of it).
    max_tokens: Optional[int] = 32768
    # Tokens per forward pass: each length runs max(1, batch_tokens // length) windows at a time.
    batch_tokens: int = 16384
    # Also score every length with attention limited to the model's training length (the windowing control).
    window_control: bool = True
    # Passkey retrieval: lengths (null: the training length times 1, 2, 4 and 8), depths of the key in the
    # filler (0 = start, 1 = end), seeded trials per (length, depth), wrong keys the true key is ranked against.
    passkey: bool = True
    passkey_lengths: Optional[list[int]] = None
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    passkey_trials: int = 4
    passkey_distractors: int = 9
    seed: int = 1234

    def __post_init__(self) -> None:
        check_choice("eval.mode", self.mode, ("nonoverlapping", "sliding"))
        check_choice("eval.windows", self.windows, EVAL_WINDOWS)
        select_multiple(self.select)
        for key in ("lengths", "passkey_lengths"):
            values = getattr(self, key)
            if values is not None and len(values) == 0:
                raise ConfigError(f"eval.{key}=[] is not allowed; give token counts, or null for the defaults")
            for length in values or ():
                check_positive(f"eval.{key}[]", length)
                if length < 2:
                    raise ConfigError(f"eval.{key} holds {length}; every length must be >= 2 tokens")
        if self.stride is not None:
            if self.mode != "sliding":
                raise ConfigError(
                    f"eval.stride={self.stride} is for eval.mode=sliding (eval.mode={self.mode!r}); "
                    "drop it or set eval.mode=sliding"
                )
            check_positive("eval.stride", self.stride)
            too_short = [length for length in self.lengths or () if self.stride >= length]
            if too_short:
                raise ConfigError(
                    f"eval.stride={self.stride} is not allowed: it must be smaller than every eval length, and "
                    f"eval.lengths holds {too_short[0]}; a window of L moved by S scores its last S tokens"
                )
        if self.max_tokens is not None:
            check_positive("eval.max_tokens", self.max_tokens)
        check_positive("eval.batch_tokens", self.batch_tokens)
        if self.passkey and not self.passkey_depths:
            raise ConfigError("eval.passkey_depths=[] is not allowed with eval.passkey=true; give depths in [0, 1]")
        for depth in self.passkey_depths:
            if not 0.0 <= depth <= 1.0:
                raise ConfigError(f"eval.passkey_depths holds {depth!r}; every depth must be in [0, 1]")
        check_positive("eval.passkey_trials", self.passkey_trials)
        check_positive("eval.passkey_distractors", self.passkey_distractors)
        for key in ("compare", "checkpoint"):
            values = getattr(self, key)
            for value in values if isinstance(values, list) else [values]:
                if value is not None and not str(value).strip():
                    raise ConfigError(f"eval.{key} holds an empty path; give a run directory")


@dataclass
class ExportConfig:
    """``stage=export``: a Hugging Face model directory ``<run_dir>/hf/`` (``docs/export.md``)."""

    # Weights to export instead of the run's final ones: anything eval.checkpoint accepts.
    checkpoint: Optional[str] = None
    dtype: str = "fp32"
    # The transformers class: auto (the one that represents the model), bloom, mpt or falcon (model/hf_formats.py).
    format: str = "auto"

    def __post_init__(self) -> None:
        check_choice("export.dtype", self.dtype, EXPORT_DTYPES)
        check_choice("export.format", self.format, EXPORT_FORMATS)
        if self.checkpoint is not None and not str(self.checkpoint).strip():
            raise ConfigError("export.checkpoint holds an empty path; give a run directory or a checkpoint")


@dataclass
class GenerateConfig:
    """``stage=generate``: decoding with an ALiBi KV cache (``docs/generate.md``)."""

    prompt: Optional[str] = None
    # A text file with one prompt a line (instead of, or besides, generate.prompt).
    prompt_file: Optional[str] = None
    max_new_tokens: int = 64
    # 0 is greedy decoding.
    temperature: float = 0.8
    top_k: Optional[int] = None
    top_p: float = 1.0
    seed: int = 1234
    # Keep only the last W keys in the cache (positions stay global): constant memory for any length.
    window: Optional[int] = None
    # Weights to decode with instead of the run's final ones: anything eval.checkpoint accepts.
    checkpoint: Optional[str] = None
    # Prompts decoded together (of any lengths: no padding enters attention).
    batch_size: int = 8
    # A prompt longer than this many tokens is refused before any decoding (a stray huge line would decode for hours).
    max_prompt_tokens: int = 32768

    def __post_init__(self) -> None:
        check_positive("generate.max_new_tokens", self.max_new_tokens)
        check_positive("generate.max_prompt_tokens", self.max_prompt_tokens)
        check_positive("generate.batch_size", self.batch_size)
        check_positive("generate.temperature", self.temperature, allow_zero=True)
        if self.top_k is not None:
            check_positive("generate.top_k", self.top_k)
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"generate.top_p={self.top_p!r} is not allowed; it must be in (0, 1]")
        if self.window is not None:
            check_positive("generate.window", self.window)


@dataclass
class HarnessConfig:
    """``stage=harness``: EleutherAI's lm-evaluation-harness on the export ``<run_dir>/hf/`` (``docs/eval.md``,
    "Downstream tasks"); ``stage=all`` ends with it when ``tasks`` is not empty."""

    # lm-eval task, group or tag names (hellaswag, arc_easy, mmlu, ...); []: stage=all runs no harness.
    tasks: list[str] = field(default_factory=list)
    # Examples shown before each question; null: each task's own default (0 for most).
    num_fewshot: Optional[int] = None
    # Examples per task: a whole number >= 1, or a fraction in (0, 1) of each task; null: all. With a limit the
    # numbers are not comparable with published ones (for trying a setup).
    limit: Optional[float] = None
    batch_size: Any = 1
    # A folder of task YAMLs in lm-eval's own format (local or private tasks); they win over built-in namesakes.
    include_path: Optional[str] = None
    # null: the run's device (cuda on a GPU machine, else cpu).
    device: Optional[str] = None
    # Python, numpy, torch and few-shot sampling seeds.
    seed: int = 1234
    # Longest input in tokens; longer ones lose tokens from the left (lm-eval's rule). null: no limit, every input is
    # scored at its full length (ALiBi reads past the training length).
    max_length: Optional[int] = None
    # Also write every scored request: <run_dir>/eval/harness_samples/<task>.jsonl.
    log_samples: bool = False
    # Run directories (or harness.json files) whose results are tabulated beside this run's.
    compare: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for task in self.tasks:
            if not isinstance(task, str) or not task.strip():
                raise ConfigError(f"harness.tasks holds {task!r}; give lm-eval task names, e.g. [hellaswag,arc_easy]")
        if self.num_fewshot is not None:
            check_positive("harness.num_fewshot", self.num_fewshot, allow_zero=True)
        if self.limit is not None and (
            not math.isfinite(self.limit) or self.limit <= 0 or (self.limit >= 1 and self.limit != int(self.limit))
        ):
            raise ConfigError(
                f"harness.limit={self.limit:g} is not allowed; give a whole number of examples per task >= 1, a "
                "fraction in (0, 1) of each task, or null for all of them"
            )
        batch = str(self.batch_size)
        if isinstance(self.batch_size, bool) or not (
            (batch.isdigit() and int(batch) >= 1) or HARNESS_AUTO_BATCH.fullmatch(batch)
        ):
            raise ConfigError(f"harness.batch_size={batch!r} is not allowed; give a whole number >= 1, auto or auto:N")
        self.batch_size = int(batch) if batch.isdigit() else batch
        if batch.startswith("auto") and self.max_length is None:
            raise ConfigError(
                f"harness.batch_size={batch} needs harness.max_length=N: lm-eval sizes its batches for inputs of "
                "max_length tokens (null: no limit); give a number, or set harness.max_length"
            )
        if self.max_length is not None:
            check_positive("harness.max_length", self.max_length)
        for key in ("include_path", "device"):
            value = getattr(self, key)
            if value is not None and not str(value).strip():
                raise ConfigError(f"harness.{key}='' is not allowed; give a value or null")
        for value in self.compare:
            if not str(value).strip():
                raise ConfigError("harness.compare holds an empty path; give run directories")


@dataclass
class WandbConfig:
    mode: str = "disabled"
    project: str = "alibi-pretrain"
    entity: Optional[str] = None
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_choice("wandb.mode", self.mode, ("online", "offline", "disabled"))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    harness: HarnessConfig = field(default_factory=HarnessConfig)
    stage: str = "all"
    run_dir: str = "runs/default"
    # Print the run's plan (sizes, batch, FLOPs, memory per device) and exit.
    print_plan: bool = False
    # The number of devices to plan for; null: the launcher's world size.
    plan_world_size: Optional[int] = None

    def __post_init__(self) -> None:
        check_choice("stage", self.stage, STAGES)
        if self.plan_world_size is not None:
            check_positive("plan_world_size", self.plan_world_size)
        check_schedule_fits(self)


def check_schedule_shape(schedule) -> None:
    """ConfigError unless ``train.seq_len_schedule`` is ``[[0, L0], [S1, L1], ...]`` with rising steps and lengths."""
    if schedule is None:
        return
    example = "e.g. train.seq_len_schedule=[[0,1024],[1000,2048]]"
    pairs = list(schedule)
    if not pairs or not all(
        len(pair) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in pair) for pair in pairs
    ):
        raise ConfigError(f"train.seq_len_schedule={schedule!r} is not a list of [STEP, LENGTH] pairs ({example})")
    steps, lengths = [p[0] for p in pairs], [p[1] for p in pairs]
    if steps[0] != 0:
        raise ConfigError(f"train.seq_len_schedule starts at step {steps[0]}; its first STEP must be 0 ({example})")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ConfigError(f"train.seq_len_schedule has steps {steps}; they must rise ({example})")
    if min(lengths) < 1:
        raise ConfigError(f"train.seq_len_schedule has lengths {lengths}; each must be >= 1")
    if any(b <= a for a, b in zip(lengths, lengths[1:])):
        raise ConfigError(
            f"train.seq_len_schedule has lengths {lengths}: they must rise (short windows first, as BTLM's 2k -> 8k); "
            f"{example}"
        )


def check_schedule_fits(cfg: Config) -> None:
    """ConfigError when a length of ``train.seq_len_schedule`` cannot hold a micro-batch's tokens (``micro_batch_size
    x model.seq_len``, constant) in whole sequences, or a learned position table cannot reach the longest one."""
    schedule = cfg.train.seq_len_schedule
    if not schedule:
        return
    tokens = cfg.train.micro_batch_size * cfg.model.seq_len
    for _, length in schedule:
        if tokens % length:
            raise ConfigError(
                f"train.seq_len_schedule holds length {length}, which does not divide the {tokens} tokens of a "
                f"micro-batch (train.micro_batch_size={cfg.train.micro_batch_size} x model.seq_len="
                f"{cfg.model.seq_len}, kept constant): use lengths that divide it"
            )
    longest = max(length for _, length in schedule)
    rows = (cfg.model.max_positions or cfg.model.seq_len) if cfg.model.pos_encoding == "learned" else None
    if rows is not None and longest > rows:
        raise ConfigError(
            f"train.seq_len_schedule reaches length {longest}, but model.pos_encoding=learned has {rows} position "
            "rows (model.max_positions); raise model.max_positions or shorten the schedule"
        )


GROUPS = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "parallel": ParallelConfig,
    "eval": EvalConfig,
    "wandb": WandbConfig,
}


def register_configs() -> None:
    """Register the schemas as ``base_<group>`` (each group YAML starts with ``defaults: [base_<group>]``)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="base_config", node=Config)
    for group, schema in GROUPS.items():
        store.store(group=group, name=f"base_{group}", node=schema)
