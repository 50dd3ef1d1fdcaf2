"""The export stage: ``<run_dir>/hf/``, a ``BloomForCausalLM``, ``MptForCausalLM`` or ``FalconForCausalLM`` directory
(``export.format``; ``pretrain.model.hf_formats``) that ``transformers`` loads with no custom code (``docs/export.md``).

``plan_export`` finds the weights (the run's final ones, or anything ``eval.checkpoint`` accepts, through
``export.checkpoint``) and the tokenizer, and refuses what no format or the tokenizer conversion cannot represent:
all before any work (``pipeline.check_before_work`` calls it). ``run_export`` writes the directory on rank 0 (the
other ranks wait) under a temporary name next to it and renames it into place once complete, so a crash never
leaves a half-written ``hf/`` and an older export is replaced only by a complete new one. The converted
tokenizer is checked against sentencepiece on the run's validation split (when its prepared corpus is there)
before anything is renamed into place.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pretrain.config import Config, ModelConfig
from pretrain.data.prepare import load_prepared
from pretrain.errors import ConfigError, PipelineError
from pretrain.eval.sources import ModelSource, checkpoint_source, source_model_config
from pretrain.export.fidelity import measure
from pretrain.export.model_card import model_card
from pretrain.export.tokenizer import build_tokenizer, check_convertible, check_same_encoding, tokenizer_files
from pretrain.extras import MissingExtraError
from pretrain.model.falcon import ROUNDING_NOTE
from pretrain.model.hf_formats import HfFormat, choose_format
from pretrain.parallel.distributed import DistContext, run_on_main
from pretrain.run_files import RunFiles, file_sha256
from pretrain.train.checkpoint import complete_tags
from pretrain.train.weights import WEIGHTS, load_weights, recorded_tokenizer_sha256

HF_DIR = "hf"  # RunFiles.hf
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# The validation split checked against sentencepiece: all of it, up to this many documents.
MAX_CHECK_DOCUMENTS = 20_000
# Strings whose ids and round trip are checked on every export, corpus or not.
EDGE_TEXTS = (
    "",
    " ",
    "  leading and trailing spaces  ",
    "\n\nblank lines\n\n",
    "\tdef f(x):\n\t\treturn x  # tabs\t\n",
    "runs     of    spaces",
    "digits 1234567890 3.14159e-10 0x7FFF",
    "bytes outside the alphabet: é ß ☃ 日本語 🎉 \u00a0 \u3000 \r\n\x00\x7f",
    "special-looking text: </s> <s> <pad> <unk> <0x41>",
    "no newline at the end",
)


@dataclass(frozen=True)
class ExportPlan:
    source: ModelSource
    model_cfg: ModelConfig
    tokenizer: Path
    fmt: HfFormat


def hf_dir(run_dir: str | Path) -> Path:
    return RunFiles(run_dir).hf


def export_source(cfg: Config) -> ModelSource:
    """The weights to export: ``export.checkpoint``, or the run's final weights."""
    if cfg.export.checkpoint is not None:
        return checkpoint_source(cfg.export.checkpoint, "export.checkpoint")
    files = RunFiles(cfg.run_dir)
    if not (files.checkpoints / WEIGHTS).is_file():
        tags = complete_tags(files.checkpoints)
        hint = f"; to export a run still training: export.checkpoint={files.checkpoints / tags[-1]}" if tags else ""
        raise PipelineError(
            f"no trained weights in {files.checkpoints / WEIGHTS}: train first (stage=train), or give "
            f"export.checkpoint=PATH{hint}"
        )
    return ModelSource(files.root.resolve().name, files.checkpoints, files.root, "run_dir")


def find_tokenizer(cfg: Config, source: ModelSource) -> Path:
    """The sentencepiece model the weights were trained with: their run's ``tokenizer/spm.model`` (looking up
    from the weights), else this run directory's."""
    candidates = [source.run_dir] if source.run_dir is not None else []
    candidates += list(Path(source.weights_dir).resolve().parents)[:3]
    candidates.append(Path(cfg.run_dir))
    for directory in candidates:
        path = RunFiles(directory).tokenizer
        if path.is_file():
            return path
    raise PipelineError(
        f"no tokenizer for the weights in {source.weights_dir}: expected {RunFiles(cfg.run_dir).tokenizer} "
        "(written by the prepare stage)"
    )


def check_trained_tokenizer(source: ModelSource, tokenizer: Path) -> None:
    """The tokenizer exported with the weights must be the one they were trained with: training records its SHA-256
    with the final weights (``model_config.json``) and every checkpoint (``complete.json``). Weights saved before it
    was recorded are checked by their vocabulary size only (in ``_write``)."""
    expected = recorded_tokenizer_sha256(source.weights_dir)
    if expected is None:
        return
    actual = file_sha256(tokenizer)
    if actual != expected:
        raise PipelineError(
            f"the tokenizer {tokenizer} (SHA-256 {actual[:12]}...) is not the one the weights in "
            f"{source.weights_dir} were trained with (SHA-256 {expected[:12]}..., recorded with them): their token ids "
            f"would mean other pieces; put that run's tokenizer back at {tokenizer} (data.* settings of another "
            "corpus replace it), or export the weights from the run they belong to"
        )


def plan_export(cfg: Config) -> ExportPlan:
    """What to export; raises ConfigError (a model no transformers class, or not ``export.format``'s, represents) or
    PipelineError (missing weights or tokenizer, a tokenizer that does not convert, a vocabulary mismatch) before any
    work."""
    source = export_source(cfg)
    model_cfg = source_model_config(source)
    fmt = choose_format(model_cfg, cfg.export.format)
    tokenizer = find_tokenizer(cfg, source)
    check_trained_tokenizer(source, tokenizer)
    check_convertible(tokenizer.read_bytes(), str(tokenizer))
    return ExportPlan(source, model_cfg, tokenizer, fmt)


def export_refusal(cfg: Config) -> str | None:
    """Why ``stage=all`` will not be able to export this config's model (None when it will): the model settings
    no transformers class (or not ``export.format``'s) represents, or a tokenizer type that does not convert exactly."""
    try:
        choose_format(cfg.model, cfg.export.format)
    except ConfigError as err:
        return str(err)
    if cfg.data.tokenizer is None and cfg.data.tokenizer_type != "bpe":
        return (
            f"data.tokenizer_type={cfg.data.tokenizer_type}: only BPE tokenizers convert exactly to a Hugging Face "
            "tokenizer; the export is skipped"
        )
    return None


def run_export(cfg: Config, ctx: DistContext, say=print) -> Path | None:
    """Write ``<run_dir>/hf/`` on rank 0 while the other ranks wait; return its path on every rank.

    Under ``stage=all`` a model that cannot be exported is skipped with one line (returns None).
    """
    if cfg.stage == "all":
        reason = export_refusal(cfg)
        if reason is None:
            try:
                plan_export(cfg)
            except (ConfigError, PipelineError) as err:
                reason = str(err)
        if reason is not None:
            if ctx.is_main:
                say(f"[export] skipped: {reason}")
            return None
    return Path(run_on_main(ctx, lambda: str(export_hf(cfg, plan_export(cfg), say)), "export the model"))


def export_hf(cfg: Config, plan: ExportPlan, say=print) -> Path:
    """Build the export in a temporary sibling of ``<run_dir>/hf`` and rename it into place."""
    target = hf_dir(cfg.run_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_stale(target, say)
    build = target.parent / f".{HF_DIR}.tmp-{os.getpid()}"
    build.mkdir()
    try:
        _write(cfg, plan, build, say)
        _replace(build, target)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    say(f"[export] wrote {target}: load it with AutoModelForCausalLM.from_pretrained({str(target)!r})")
    return target


def recover_stale(target: Path, say=print) -> None:
    """Clean up after an export that was killed: its build folders (``.hf.tmp-PID``) are removed, and a previous
    export it had moved aside (``.hf.old-PID``, where exchanging the two folders in one step is not supported) is
    put back as ``hf/`` when there is none, else removed."""
    for stale in target.parent.glob(f".{HF_DIR}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    olds = sorted(target.parent.glob(f".{HF_DIR}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not target.exists():
        os.replace(olds.pop(), target)
        say(f"[export] put back {target}: an export killed while replacing it had moved it aside")
    for stale in olds:
        shutil.rmtree(stale, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is not supported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _replace(build: Path, target: Path) -> None:
    """Put the complete export ``build`` in place of ``target``: a kill at any point leaves the previous export or
    the new one at ``target`` (exchanged in one step), or, where that is not supported, the previous one moved aside
    as ``.hf.old-PID``, which the next export puts back (``recover_stale``). ``build`` then holds what is left."""
    umask = os.umask(0)
    os.umask(umask)
    for path in build.iterdir():  # safetensors writes its file private; the export is for sharing
        path.chmod(0o666 & ~umask)
    if not target.exists():
        os.replace(build, target)
        return
    if _exchange(build, target):
        return  # build now holds the previous export, removed by the caller
    old = target.parent / f".{HF_DIR}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(build, target)
    shutil.rmtree(old, ignore_errors=True)


def _write(cfg: Config, plan: ExportPlan, out: Path, say) -> None:
    import sentencepiece as spm
    import torch
    from safetensors.torch import save_file

    dtype_name = DTYPES[cfg.export.dtype]
    model_cfg, state = load_weights(plan.source.weights_dir)
    model_bytes = plan.tokenizer.read_bytes()
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    if sp.get_piece_size() != model_cfg.vocab_size:
        raise PipelineError(
            f"the weights in {plan.source.weights_dir} have a vocabulary of {model_cfg.vocab_size}, but the "
            f"tokenizer {plan.tokenizer} has {sp.get_piece_size()} pieces: export them with the run they belong to"
        )
    say(f"[export] {plan.source.weights_dir} ({model_cfg.n_layer} layers, d_model {model_cfg.d_model}) as {dtype_name}")

    # The tokenizer first: a conversion that disagrees with sentencepiece stops the export before the weights.
    verified_on = _check_tokenizer(cfg, model_bytes, sp)
    say(f"[export] tokenizer: {verified_on}")
    for name, text in tokenizer_files(model_bytes, where=str(plan.tokenizer)).items():
        (out / name).write_text(text, encoding="utf-8")

    torch_dtype = getattr(torch, dtype_name)
    fmt = plan.fmt
    tensors = {
        name: (t.to(torch_dtype) if t.is_floating_point() else t).contiguous()
        for name, t in fmt.state_dict(state, model_cfg).items()
    }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    token_ids = {f"{name}_token_id": i for name, i in _special_ids(sp).items() if name != "unk"}
    config_dict = fmt.config(model_cfg, token_ids, dtype_name)
    (out / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    say(f"[export] as {fmt.architecture}")
    fidelity = None
    if not fmt.exact:
        say(f"[export] warning: {ROUNDING_NOTE}; measuring it on validation tokens (in the model card)")
        try:
            fidelity = measure(model_cfg, state, fmt, config_dict, tensors, _validation_tokens(cfg, model_bytes))
        except MissingExtraError as err:  # the export itself needs no transformers: say why there is no number
            say(f"[export] not measured: {err}")
            fidelity = []
        for row in fidelity:
            say(
                f"[export] {fmt.architecture} vs this model at {row['tokens']} tokens: max |logit difference| "
                f"{row['max_abs_logit_diff']:.2e}, same top-1 token {100 * row['top1_agreement']:.2f}%, "
                f"perplexity {100 * row['ppl_rel_diff']:+.3f}%"
            )
    generation = {**token_ids, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    run_dir = plan.source.run_dir or Path(cfg.run_dir)
    files = RunFiles(run_dir)
    results = _read_json(files.eval_results) or _read_json(RunFiles(cfg.run_dir).eval_results)
    results_dir = files.eval_dir if _read_json(files.eval_results) else RunFiles(cfg.run_dir).eval_dir
    plot = None
    if results and (results_dir / "ppl_vs_length.png").is_file():
        plot = "ppl_vs_length.png"
        shutil.copyfile(results_dir / plot, out / plot)
    parameters = sum(t.numel() for t in state.values())
    card = model_card(
        model_cfg,
        parameters,
        dtype_name,
        source=str(plan.source.weights_dir),
        training=_training_summary(files),
        data=_data_summary(cfg, model_bytes),
        tokenizer_check=(
            "The tokenizer is sentencepiece's (BPE with byte fallback) converted to a `tokenizers` BPE model; at "
            f"export it gave the same ids as sentencepiece and decoded back to the same text on {verified_on}."
        ),
        results=results,
        results_match=_same_weights(results, plan.source),
        plot_name=plot,
        architecture=fmt.architecture,
        fidelity=fidelity,
        fidelity_note=None if fidelity is None else ROUNDING_NOTE[0].upper() + ROUNDING_NOTE[1:],
    )
    (out / "README.md").write_text(card, encoding="utf-8")


def _validation_tokens(cfg: Config, model_bytes: bytes):
    """The first validation documents of the prepared corpus, joined (a 1-D int64 tensor), or None without one."""
    import torch

    corpus = _prepared_corpus(cfg, model_bytes)
    if corpus is None:
        return None
    pieces, count = [], 0
    for doc in corpus.val_documents():
        pieces.append(torch.as_tensor(doc.astype("int64")))
        count += len(doc)
        if count >= 64 * 1024:
            break
    return torch.cat(pieces) if pieces else None


def _special_ids(sp) -> dict[str, int]:
    ids = {"pad": sp.pad_id(), "unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id()}
    return {k: v for k, v in ids.items() if v >= 0}


def _check_tokenizer(cfg: Config, model_bytes: bytes, sp):
    """Compare the converted tokenizer with sentencepiece on edge cases and on the validation split of the
    prepared corpus of these data.* settings (when it is there and has this tokenizer). A difference is an error."""
    tokenizer = build_tokenizer(model_bytes)
    documents = [(text, sp.encode(text)) for text in EDGE_TEXTS]
    where = f"{len(EDGE_TEXTS)} edge-case strings"
    corpus = _prepared_corpus(cfg, model_bytes)
    if corpus is not None:
        eos = sp.eos_id()
        count = 0
        for doc in corpus.val_documents():
            ids = doc.tolist()
            if ids and ids[-1] == eos:
                ids = ids[:-1]
            # sentencepiece is lossless on the corpus: its decode is the document's text.
            documents.append((sp.decode(ids), ids))
            count += 1
            if count == MAX_CHECK_DOCUMENTS:
                break
        where = f"the {count} validation documents of {corpus.directory.name} and {where}"
    agreement = check_same_encoding(tokenizer, documents)
    if not agreement.exact:
        raise PipelineError(
            f"the converted tokenizer disagrees with sentencepiece ({agreement.summary()}): "
            f"{agreement.first_difference}; the export is not written"
        )
    return f"{where} ({agreement.tokens:,} tokens)"


def _prepared_corpus(cfg: Config, model_bytes: bytes):
    try:
        corpus = load_prepared(cfg)
    except (PipelineError, OSError, ValueError):
        return None
    return corpus if corpus.tokenizer_path.read_bytes() == model_bytes else None


def _data_summary(cfg: Config, model_bytes: bytes) -> str | None:
    corpus = _prepared_corpus(cfg, model_bytes)
    if corpus is None:
        return None
    meta = corpus.metadata
    train = meta["splits"]["train"]
    return (
        f"`data={meta.get('source')}` ({corpus.directory.name}): {train['documents']:,} training documents, "
        f"{train['tokens']:,} tokens; sentencepiece {meta.get('tokenizer', {}).get('type', 'bpe')} vocabulary of "
        f"{meta['vocab_size']}"
    )


def _training_summary(files: RunFiles) -> dict | None:
    records = _read_jsonl(files.metrics)
    if not records:
        return None
    last = records[-1]
    lrs = [r["lr"] for r in records if isinstance(r.get("lr"), (int, float))]
    out = {"steps": last.get("step"), "tokens": last.get("tokens"), "loss": last.get("loss")}
    out["peak_lr"] = max(lrs) if lrs else None
    vals = [r for r in _read_jsonl(files.validation) if isinstance(r.get("val_loss"), (int, float))]
    if vals and math.isfinite(vals[-1]["val_loss"]):
        out["val_loss"] = vals[-1]["val_loss"]
    return out


def _same_weights(results: dict | None, source: ModelSource) -> bool:
    if not results or not results.get("models"):
        return False
    scored = results["models"][0].get("source")
    return scored is not None and Path(scored).resolve() == Path(source.weights_dir).resolve()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _read_jsonl(path: Path) -> list[dict]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
