"""lm-evaluation-harness on the export, through the real command line and with no network: ``stage=all`` with
``harness.tasks`` ends by scoring the tests' local tasks (``harness_tasks/``: a multiple-choice and a loglikelihood
task over JSON files, through ``harness.include_path``) on the tiny model: ``eval/harness.json``, the console table and
the model card's section are written, an input past the training length is scored whole, and one loglikelihood equals
the sum of our own model's token log-probabilities. Then the one-line refusals (an unknown task, a dataset that
cannot be downloaded, lm-eval missing, ``harness.limit=0``, a model with no export), a stale export made again
first, and ``harness.compare``. One model is trained for the whole module."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from cli import SMALL_RUN, TESTS, refusal, run_pretrain

from pretrain.eval.perplexity import token_losses
from pretrain.model.gpt import GPT
from pretrain.train.weights import load_weights

pytest.importorskip("lm_eval", reason="the harness tests need lm-eval (the 'harness' extra; dev installs it)")

TASKS = TESTS / "e2e" / "harness_tasks"
SCORED = "harness.tasks=[tiny_choice,tiny_loglikelihood]"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TRAIN = [
    "model=tiny",
    *SMALL_RUN,
    "train.max_steps=6",
    "eval.lengths=[32]",
    "eval.max_tokens=1024",
    "eval.passkey=false",
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Commands run here: the tasks' relative data_files (harness_tasks/...) are read from it."""
    workdir = tmp_path_factory.mktemp("harness")
    shutil.copytree(TASKS, workdir / "harness_tasks")
    return workdir


def harness(args: list[str], workdir: Path, check: bool = True, env: dict | None = None):
    return run_pretrain(
        ["harness.include_path=harness_tasks", *args], cwd=workdir, check=check, env={**OFFLINE, **(env or {})}
    )


@pytest.fixture(scope="module")
def scored(workdir):
    """``stage=all`` with the local tasks, every request logged: the run directory and the command's output."""
    run_dir = workdir / "run"
    proc = harness([f"run_dir={run_dir}", *TRAIN, SCORED, "harness.log_samples=true"], workdir)
    return run_dir, proc.stdout


def test_stage_all_ends_with_the_harness_on_the_export(scored):
    run_dir, stdout = scored
    report = json.loads((run_dir / "eval" / "harness.json").read_text())
    rows = {(r["task"], r["metric"]): r for r in report["rows"]}
    assert {("tiny_choice", "acc"), ("tiny_choice", "acc_norm"), ("tiny_loglikelihood", "acc")} <= set(rows)
    assert rows[("tiny_choice", "acc")]["examples"] == 6 and rows[("tiny_choice", "acc")]["stderr"] is not None
    assert report["lm_eval"]["results"]["tiny_choice"]["acc,none"] == rows[("tiny_choice", "acc")]["value"]
    assert set(report["task_hashes"]) == {"tiny_choice", "tiny_loglikelihood"}
    assert report["versions"]["lm_eval"] and report["model"]["train_seq_len"] == 32
    assert report["checkpoint"]["weights"] == str((run_dir / "checkpoints").resolve())
    assert report["checkpoint"]["step"] == 6 and report["command"].startswith("pretrain ")
    assert SCORED in report["command"]
    # The long context (> 32 tokens) is scored whole: counted, nothing cut.
    lengths = report["lengths"]["tiny_loglikelihood"]
    assert lengths["over_train_length"] == 1 and lengths["longest"] > 100 and lengths["cut"] == 0
    assert "tiny_loglikelihood: 1 of 3 inputs are longer than the training length 32" in stdout
    assert "tiny_choice" in stdout and "acc_norm" in stdout  # the console table
    card = (run_dir / "hf" / "README.md").read_text()
    assert card.count("## Downstream tasks") == 1 and "| tiny_choice | 0 | acc |" in card
    assert "## Length extrapolation" in card  # the export's own card is kept around the section


def test_a_harness_loglikelihood_is_the_sum_of_our_models_token_log_probabilities(scored):
    """lm-eval moves the context's trailing whitespace into the continuation, encodes context + continuation whole
    and scores the tokens past the context's own encoding; done here with sentencepiece and our GPT."""
    run_dir, _ = scored
    samples = [json.loads(line) for line in (run_dir / "eval" / "harness_samples" / "tiny_loglikelihood.jsonl").open()]
    sp = spm.SentencePieceProcessor(model_file=str(run_dir / "tokenizer" / "spm.model"))
    model_cfg, state = load_weights(run_dir / "checkpoints")
    model = GPT(model_cfg).eval()
    model.load_state_dict(state)
    checked = []
    for sample in samples:
        (context, continuation), harness_ll = sample["arguments"][0], sample["resps"][0][0][0]
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, n_context = sp.encode(context + continuation), len(sp.encode(context))
        ids = torch.tensor([whole])
        with torch.no_grad():
            losses = token_losses(model, ids[:, :-1], ids[:, 1:])[0]
        ours = -losses[n_context - 1 :].double().sum().item()
        assert abs(harness_ll - ours) < 1e-4, (len(whole), harness_ll, ours)
        checked.append(len(whole))
    assert max(checked) > 3 * model_cfg.seq_len  # one of them well past the training length


def test_an_unknown_task_is_one_line_before_the_model_loads(scored, workdir):
    run_dir, _ = scored
    proc = harness(["stage=harness", f"run_dir={run_dir}", "harness.tasks=[tiny_choise]"], workdir, check=False)
    line = refusal(proc)
    assert "has no task, group or tag 'tiny_choise'" in line and "did you mean tiny_choice" in line
    assert "[harness]" not in proc.stdout


def test_a_dataset_that_cannot_be_downloaded_is_one_line_before_the_model_loads(scored, workdir):
    run_dir, _ = scored
    proc = harness(["stage=harness", f"run_dir={run_dir}", "harness.tasks=[tiny_offline]"], workdir, check=False)
    line = refusal(proc)
    assert "harness task 'tiny_offline': its dataset could not be loaded" in line and "HF_DATASETS_OFFLINE" in line
    assert " on cpu" not in proc.stdout  # the model was not loaded


def test_without_lm_eval_the_stage_says_how_to_install_it(scored, workdir):
    run_dir, _ = scored
    shim = workdir / "no_lm_eval"
    shim.mkdir(exist_ok=True)
    (shim / "lm_eval.py").write_text("raise ModuleNotFoundError(\"No module named 'lm_eval'\", name='lm_eval')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", ""), str(TESTS.parent)])}
    proc = harness(["stage=harness", f"run_dir={run_dir}", SCORED], workdir, check=False, env=env)
    line = refusal(proc)
    assert "needs lm-eval, which is not installed" in line and 'pip install -e ".[harness]"' in line


def test_bad_settings_and_a_model_without_export_are_one_line_before_any_work(workdir):
    proc = harness(["stage=harness", f"run_dir={workdir / 'x'}", SCORED, "harness.limit=0"], workdir, check=False)
    assert "harness.limit=0 is not allowed" in refusal(proc)
    run_dir = workdir / "rope"
    args = [f"run_dir={run_dir}", *TRAIN, "model.pos_encoding=rope", SCORED]
    line = refusal(harness(args, workdir, check=False))
    assert line.startswith("error: harness.tasks scores the export, which this model cannot have")
    assert "pos_encoding" in line and not run_dir.exists()


def test_a_stale_export_is_made_again_first_and_compare_puts_runs_side_by_side(scored, workdir):
    run_dir, _ = scored
    weights = run_dir / "checkpoints" / "model.safetensors"
    later = (run_dir / "hf" / "model.safetensors").stat().st_mtime + 10
    os.utime(weights, (later, later))
    proc = harness(["stage=harness", f"run_dir={run_dir}", "harness.tasks=[tiny_choice]", "harness.limit=2"], workdir)
    assert "is older than the weights: exporting" in proc.stdout and "[export] wrote" in proc.stdout
    report = json.loads((run_dir / "eval" / "harness.json").read_text())
    assert report["settings"]["limit"] == 2 and report["rows"][0]["examples"] == 2
    assert "limit 2 examples per task" in (run_dir / "hf" / "README.md").read_text()

    other = workdir / "other"
    (other / "eval").mkdir(parents=True)
    report["task_hashes"]["tiny_choice"] = "0" * 64
    report["settings"]["limit"] = None
    (other / "eval" / "harness.json").write_text(json.dumps(report))
    proc = harness(["stage=harness", f"run_dir={run_dir}", f"harness.compare=[{other}]"], workdir)
    table = (run_dir / "eval" / "harness_compare.md").read_text()
    assert "| task | metric | run | other |" in table and "±" in table and "†" in table
    assert table.splitlines()[0] in proc.stdout
