"""The export stage through the real command line: ``stage=all`` ends with ``<run_dir>/hf/``, which ``transformers``
loads offline in a process where neither ``pretrain`` nor ``sentencepiece`` can be imported, with our logits at 1x
and 8x the training length and our tokenizer's ids on the whole validation split; an intermediate checkpoint
exports in bf16; a model no transformers class represents is skipped by ``stage=all`` and refused by ``stage=export``
with no ``hf/`` left behind; MPT's block exports as ``MptForCausalLM``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from cli import SMALL_RUN, cli_env, run_pretrain

from pretrain.config import DataConfig
from pretrain.data.prepare import load_prepared
from pretrain.model.gpt import GPT
from pretrain.train.weights import load_weights

EVAL = ["eval.lengths=[32,256]", "eval.max_tokens=4096", "eval.passkey=false"]
TRAIN = ["model=tiny", *SMALL_RUN, "train.max_steps=6", "train.ckpt_every=3"]

# Runs with nothing of ours: pretrain and sentencepiece cannot be imported, the hub cannot be reached.
LOADER = r"""
import json, sys
sys.modules["pretrain"] = None
sys.modules["sentencepiece"] = None
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

job = json.load(open(sys.argv[1]))
tok = AutoTokenizer.from_pretrained(job["hf"])
model = AutoModelForCausalLM.from_pretrained(job["hf"], dtype=torch.float32).eval()
out = {
    "model_class": type(model).__name__,
    "ids": [tok(text)["input_ids"] for text in job["texts"]],
    "decoded": [tok.decode(ids) for ids in job["ids"]],
}
with torch.no_grad():
    out["logits"] = {str(len(w)): model(torch.tensor([w])).logits[0].tolist() for w in job["windows"]}
json.dump(out, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


def load_in_transformers(workdir, hf, texts, ids, windows) -> dict:
    job, out = workdir / "job.json", workdir / "out.json"
    job.write_text(json.dumps({"hf": str(hf), "texts": texts, "ids": ids, "windows": windows}))
    env = cli_env({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    proc = subprocess.run(
        [sys.executable, "-c", LOADER, str(job), str(out)], cwd=workdir, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_stage_all_ends_with_an_export_transformers_loads_with_our_logits_and_ids(workdir):
    run_dir = workdir / "run"
    proc = run_pretrain([f"run_dir={run_dir}", *TRAIN, *EVAL], cwd=workdir)
    assert f"[export] wrote {run_dir / 'hf'}" in proc.stdout
    hf = run_dir / "hf"
    card = (hf / "README.md").read_text()
    assert "| 256 | 8 |" in card and "windowed loss (32)" in card and (hf / "ppl_vs_length.png").is_file()
    assert "validation documents of stdlib-" in card

    corpus = load_prepared(DataConfig(**_data_settings(), cache_dir=str(workdir / "data")))
    sp = spm.SentencePieceProcessor(model_file=str(run_dir / "tokenizer" / "spm.model"))
    docs = [doc.tolist()[:-1] for doc in corpus.val_documents()]  # each ends with </s>
    texts = [sp.decode(ids) for ids in docs]
    stream = corpus.tokens("val")[:256].tolist()
    got = load_in_transformers(workdir, hf, texts, docs, [stream[:32], stream])
    assert got["model_class"] == "BloomForCausalLM"
    same = sum(a == b for a, b in zip(got["ids"], docs, strict=True))
    assert same == len(docs) >= 5, f"{same}/{len(docs)} validation documents with the same ids"
    assert got["decoded"] == texts

    for length, diff in logit_differences(run_dir, got, [stream[:32], stream]).items():  # 1x and 8x the length 32
        assert diff < 1e-4, f"logits differ by {diff} at length {length}"

    # An intermediate checkpoint, in bf16, into another run directory (the tokenizer comes from the weights' run).
    other = workdir / "bf16"
    step = run_dir / "checkpoints" / "step_00000003"
    run_pretrain(
        ["stage=export", f"run_dir={other}", f"export.checkpoint={step}", "export.dtype=bf16", *SMALL_RUN], cwd=workdir
    )
    config = json.loads((other / "hf" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["n_layer"] == load_weights(run_dir / "checkpoints")[0].n_layer
    assert "Note: this evaluation scored" not in (other / "hf" / "README.md").read_text()


def test_unrepresentable_model_is_skipped_by_stage_all_and_refused_by_stage_export(workdir):
    run_dir = workdir / "swiglu"
    args = [f"run_dir={run_dir}", *TRAIN, "model.mlp=swiglu", "train.max_steps=2", *EVAL[1:], "eval.lengths=[32]"]
    proc = run_pretrain(args, cwd=workdir)
    line = "model.mlp=swiglu: no transformers class has SwiGLU with ALiBi"
    assert f"[export] skipped: {line}" in proc.stdout
    assert (run_dir / "eval" / "results.json").is_file() and not (run_dir / "hf").exists()
    proc = run_pretrain(["stage=export", f"run_dir={run_dir}", *SMALL_RUN], cwd=workdir, check=False)
    assert proc.returncode == 2
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and line in errors[0], proc.stderr[-2000:]
    assert not (run_dir / "hf").exists() and not list(run_dir.glob(".hf.*"))


def _data_settings() -> dict:
    """SMALL_RUN's data.* values as DataConfig fields."""
    out = {}
    for arg in SMALL_RUN:
        key, value = arg.split("=", 1)
        if key.startswith("data."):
            field = key.removeprefix("data.")
            out[field] = float(value) if "." in value else int(value)
    return out


def test_mpt_block_exports_as_mpt_with_our_logits(workdir):
    """MPT's bias-free block (model=mpt-125m's options at the tiny shape) goes to MptForCausalLM through stage=all."""
    run_dir = workdir / "mpt"
    mpt = ["model.bias=false", "model.embedding_layernorm=false", "model.mlp=gelu"]
    proc = run_pretrain([f"run_dir={run_dir}", *TRAIN, *mpt, "train.max_steps=2", *EVAL], cwd=workdir)
    assert "[export] as MptForCausalLM" in proc.stdout
    corpus = load_prepared(DataConfig(**_data_settings(), cache_dir=str(workdir / "data")))
    stream = corpus.tokens("val")[:256].tolist()
    got = load_in_transformers(workdir, run_dir / "hf", [], [], [stream[:32], stream])
    assert got["model_class"] == "MptForCausalLM"
    for length, diff in logit_differences(run_dir, got, [stream[:32], stream]).items():  # 1x and 8x the length 32
        assert diff <= 1e-5, f"logits differ by {diff} at length {length}"


def logit_differences(run_dir: Path, got: dict, windows: list[list[int]]) -> dict[int, float]:
    """Per window length, the largest difference between the exported class's logits (``got``) and our model's."""
    model_cfg, state = load_weights(run_dir / "checkpoints")
    model = GPT(model_cfg).eval()
    model.load_state_dict(state)
    out = {}
    for window in windows:
        with torch.no_grad():
            ours = model(torch.tensor([window]))[0]
        out[len(window)] = (torch.tensor(got["logits"][str(len(window))]) - ours).abs().max().item()
    return out
