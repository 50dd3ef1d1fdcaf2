"""The evaluation stage through the real command line: the whole chain, extrapolation, controls, baselines, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from cli import SMALL_RUN, run_pretrain

from pretrain.eval.windows import (
    document_offsets,
    document_windows,
    nonoverlapping_windows,
    qualifying_documents,
    sliding_windows,
)
from pretrain.model.gpt import GPT
from pretrain.train.weights import load_weights

# Enough steps that the model has learnt to use its context, so the 4x-length check is not luck
# (checked over several seeds: see test_alibi_extrapolates_to_four_times_its_training_length).
STEPS = 300
QUICK_EVAL = ["eval.max_tokens=8192", "eval.passkey_trials=2", "eval.passkey_depths=[0.0,0.5,1.0]"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The bare chain (stage=all: prepare -> train -> eval) of a small ALiBi model, run once."""
    workdir = tmp_path_factory.mktemp("eval")
    run_dir = workdir / "alibi"
    proc = run_pretrain([f"run_dir={run_dir}", *SMALL_RUN, f"train.max_steps={STEPS}", *QUICK_EVAL], cwd=workdir)
    return workdir, run_dir, proc.stdout


def evaluate(workdir, name, *extra, check=True, weights=None):
    """``pretrain stage=eval`` of the trained model (or ``weights``) into ``workdir/name``."""
    run_dir = workdir / name
    source = weights or workdir / "alibi" / "checkpoints"
    args = ["stage=eval", f"run_dir={run_dir}", f"eval.checkpoint={source}", *SMALL_RUN, *extra]
    proc = run_pretrain(args, cwd=workdir, check=check)
    return run_dir, proc


def results(run_dir):
    return json.loads((run_dir / "eval" / "results.json").read_text())


def test_the_bare_chain_ends_with_the_table_and_the_plots(trained):
    _, run_dir, stdout = trained
    report = results(run_dir)
    # The contract: train_seq_len, mode and one entry per length with loss, ppl, tokens.
    assert report["train_seq_len"] == 32 and report["mode"] == "nonoverlapping"
    lengths = [r["length"] for r in report["results"]]
    assert lengths == [32, 64, 128, 256, 512, 1024]  # the training length x 1 .. 32
    for r in report["results"]:
        assert isinstance(r["loss"], float) and isinstance(r["ppl"], float) and isinstance(r["tokens"], int)
        assert r["ppl"] == pytest.approx(math.exp(r["loss"]))
        assert r["tokens"] == 8192  # eval.max_tokens: 8 regions of 1024 tokens, the same tokens at each length
        assert 0 < r["loss"] < math.log(512)
    for name in ("ppl_vs_length.png", "loss_vs_position.png", "passkey.png"):
        assert (run_dir / "eval" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The console table, after the training output.
    assert "length x train    loss   +-se       ppl      95% interval    tokens  windowed  full-windowed" in stdout
    assert stdout.index("trained 300 steps") < stdout.index("full-windowed")
    assert "   1024      32 " in stdout
    assert "passkey retrieval" in stdout


def test_alibi_extrapolates_to_four_times_its_training_length(trained):
    report = results(trained[1])
    ppl = {r["length"]: r["ppl"] for r in report["results"]}
    assert ppl[128] <= 1.05 * ppl[32], ppl


def test_the_numbers_are_the_models_own_loss_on_those_windows(trained):
    """The stage's loss at the training length is the model's mean loss on the same windows, computed directly."""
    workdir, run_dir, _ = trained
    model_cfg, state = load_weights(run_dir / "checkpoints")
    model = GPT(model_cfg)
    model.load_state_dict(state)
    model.eval()
    from pretrain.data.prepare import PreparedCorpus

    corpus = PreparedCorpus.open(next((workdir / "data").glob("stdlib-*")))
    tokens = np.asarray(corpus.tokens("val"), dtype=np.int64)
    windows = nonoverlapping_windows(len(tokens), 32, max_tokens=8192, region=1024)  # the longest length
    ids = torch.from_numpy(np.stack([tokens[w.start : w.start + 33] for w in windows]))
    with torch.no_grad():
        want = model(ids[:, :-1], ids[:, 1:]).item()
    got = results(run_dir)["results"][0]
    assert got["length"] == 32 and got["tokens"] == len(windows) * 32
    assert got["loss"] == pytest.approx(want, rel=1e-5)


def test_window_control_and_loss_by_position(trained):
    model = results(trained[1])["models"][0]
    for r in model["results"]:
        assert r["loss_minus_windowed"] == pytest.approx(r["loss"] - r["windowed_loss"])
        if r["length"] <= 32:  # a window of the training length changes nothing there
            assert r["windowed_loss"] == r["loss"]
    for curve, r in zip(model["loss_by_position"], model["results"]):
        bins = curve["bins"]
        assert curve["length"] == r["length"] and bins[0]["start"] == 0 and bins[-1]["end"] == r["length"]
        assert sum(b["tokens"] for b in bins) == r["tokens"]
        assert sum(b["loss"] * b["tokens"] for b in bins) / r["tokens"] == pytest.approx(r["loss"])
        assert all("windowed_loss" in b for b in bins)


def test_passkey_results_cover_the_grid(trained):
    passkey = results(trained[1])["passkey"]
    # Lengths 32 and 64 cannot hold the prompt: reported as skipped, not silently dropped.
    assert [s["length"] for s in passkey["skipped"]] == [32, 64]
    assert passkey["lengths"] == [128, 256] and passkey["depths"] == [0.0, 0.5, 1.0]
    assert len(passkey["cells"]) == 6 and passkey["chance"] == pytest.approx(0.1)
    for cell in passkey["cells"]:
        assert cell["trials"] == 2 and 0.0 <= cell["greedy"] <= 1.0 and 0.0 <= cell["likelihood"] <= 1.0
    # The depth the key came out at (a sentence boundary of the filler) is reported; 0 and 1 are exact.
    for length in (128, 256):
        depths = [c["key_depth"] for c in passkey["cells"] if c["length"] == length]
        assert depths[0] == 0.0 and depths[-1] == 1.0 and depths == sorted(depths)


def test_sliding_mode_scores_the_last_stride_tokens_of_each_window(trained):
    workdir = trained[0]
    run_dir, _ = evaluate(
        workdir, "sliding", "eval.mode=sliding", "eval.stride=16", "eval.lengths=[32,64]", "eval.max_tokens=2048",
        "eval.passkey=false", "eval.window_control=false",
    )  # fmt: skip
    report = results(run_dir)
    n_val = report["validation_tokens"]
    assert report["mode"] == "sliding"
    for r in report["results"]:
        windows = sliding_windows(n_val, r["length"], 16, max_tokens=2048)
        assert r["stride"] == 16 and r["windows"] == len(windows) and r["tokens"] == 16 * len(windows) == 2048
        assert r["min_context"] == r["length"] - 16 + 1
    # Every prediction had at least 17 tokens of context: no position below 16 in the curve.
    bins = report["models"][0]["loss_by_position"][0]["bins"]
    assert bins[0]["start"] == 16 and sum(b["tokens"] for b in bins) == 2048


def test_stream_windows_report_the_share_crossing_a_document_boundary(trained):
    _, run_dir, stdout = trained
    report = results(run_dir)
    assert report["windows"] == "stream" and report["validation_documents"] >= 1
    for r in report["results"]:
        assert 0.0 <= r["crossing_share"] <= 1.0 and 0.0 <= r["crossing_token_share"] <= r["crossing_share"]
    assert "full-windowed crossing" in stdout and "windows over the stream" in stdout


def test_document_windows_stay_inside_one_document_and_skip_a_length_none_holds(trained):
    """eval.windows=documents through the command line: windows inside one validation document (never across
    </s>), the documents that qualified per length, a length no document holds skipped with the reason (table,
    JSON, plot), the windowed control and passkey still run; the loss is the model's own on those windows."""
    workdir, alibi, _ = trained
    run_dir, proc = evaluate(
        workdir, "documents", "eval.windows=documents", "eval.lengths=[32,256,100000]", "eval.max_tokens=2048",
        "eval.passkey_lengths=[128]", "eval.passkey_depths=[0.5]", "eval.passkey_trials=1",
    )  # fmt: skip
    report = results(run_dir)
    assert report["windows"] == "documents" and report["settings"]["windows"] == "documents"
    from pretrain.data.prepare import PreparedCorpus

    corpus = PreparedCorpus.open(next((workdir / "data").glob("stdlib-*")))
    tokens = np.asarray(corpus.tokens("val"), dtype=np.int64)
    offsets = document_offsets(corpus.val_documents())
    eos = int(tokens[offsets[1] - 1])
    assert [r["length"] for r in report["results"]] == [32, 256]
    for r in report["results"]:
        assert (r["qualified_documents"], r["qualified_tokens"]) == qualifying_documents(offsets, r["length"])
        assert r["tokens"] == 2048 and "windowed_loss" in r and "crossing_share" not in r
        for w in document_windows(offsets, r["length"], "nonoverlapping", max_tokens=2048):
            assert eos not in tokens[w.start : w.start + w.length]  # no </s> among the inputs
    assert report["results"][1]["windowed_loss"] != report["results"][1]["loss"]  # 256 > 32: the control ran
    [skipped] = report["skipped"]
    assert skipped["length"] == 100000 and skipped["qualified_documents"] == 0
    assert "no validation document is long enough" in skipped["reason"]
    assert " 100000  skipped: no validation document is long enough" in proc.stdout  # the table
    assert "windows inside documents" in proc.stdout and "documents doc tokens" in proc.stdout
    assert (run_dir / "eval" / "ppl_vs_length.png").exists()
    assert report["passkey"]["cells"] and report["passkey"]["lengths"] == [128]
    # The loss at 32 is the model's own mean loss on those windows.
    model_cfg, state = load_weights(alibi / "checkpoints")
    model = GPT(model_cfg)
    model.load_state_dict(state)
    model.eval()
    windows = document_windows(offsets, 32, "nonoverlapping", max_tokens=2048)
    ids = torch.from_numpy(np.stack([tokens[w.start : w.start + 33] for w in windows]))
    with torch.no_grad():
        assert report["results"][0]["loss"] == pytest.approx(model(ids[:, :-1], ids[:, 1:]).item(), rel=1e-5)


def test_a_length_beyond_the_validation_split_is_skipped_with_a_warning(trained):
    run_dir, proc = evaluate(trained[0], "too-long", "eval.lengths=[32,100000]", "eval.passkey=false")
    report = results(run_dir)
    assert [r["length"] for r in report["results"]] == [32]
    [skipped] = report["skipped"]
    assert skipped["length"] == 100000 and "validation split is too short" in skipped["reason"]
    assert "warning: length 100000 skipped" in proc.stdout
    assert "100000  skipped:" in proc.stdout  # in the table too


def test_compare_runs_on_the_same_windows_and_learned_positions_skip_clearly(trained):
    workdir, alibi, _ = trained
    learned = workdir / "learned"
    run_pretrain(
        ["stage=train", f"run_dir={learned}", *SMALL_RUN, "model.pos_encoding=learned", "train.max_steps=20"],
        cwd=workdir,
    )
    out = workdir / "compare"
    proc = run_pretrain(
        ["stage=eval", f"run_dir={out}", *SMALL_RUN, f"eval.compare=[{alibi},{learned}]", "eval.lengths=[32,64,128]",
         "eval.passkey=false", "eval.max_tokens=2048"],
        cwd=workdir,
    )  # fmt: skip
    report = results(out)
    names = [m["name"] for m in report["models"]]
    assert names == ["alibi", "learned"] and report["model"] == "alibi"
    alibi_results, learned_model = report["models"][0]["results"], report["models"][1]
    assert [r["length"] for r in alibi_results] == [32, 64, 128]
    assert [r["length"] for r in learned_model["results"]] == [32]
    assert learned_model["results"][0]["tokens"] == alibi_results[0]["tokens"] == 2048
    assert [s["length"] for s in learned_model["skipped"]] == [64, 128]
    assert "learned has 32 position rows" in learned_model["skipped"][0]["reason"]
    assert "learned (learned, trained at 32)" in proc.stdout and "skipped: model.pos_encoding=learned" in proc.stdout
    assert (out / "eval" / "ppl_vs_length.png").exists()


def test_eval_logs_a_table_and_the_plots_to_the_trained_runs_wandb(trained):
    workdir = trained[0]
    run_dir = workdir / "wandb-eval"
    (run_dir / "train").mkdir(parents=True)
    (run_dir / "train" / "wandb_id").write_text("abc123trained")  # as the train stage leaves it
    evaluate(workdir, "wandb-eval", "wandb.mode=offline", "eval.lengths=[32,64]", "eval.passkey=false")
    [offline] = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline.name.endswith("-abc123trained")  # the same run, resumed
    log = next(offline.glob("run-*.wandb")).read_bytes()
    assert b"eval/results" in log and b"eval/ppl_vs_length" in log


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval.checkpoint=/no/such/dir"], "error: eval.checkpoint='/no/such/dir': no such file or directory"),
        (["eval.compare=[{empty}]"], "error: eval.compare: '{empty}' has no trained weights"),
        (
            ["eval.mode=sliding", "eval.stride=64"],
            "error: eval.stride=64 is not allowed: it must be smaller than every",
        ),
        (["eval.lengths=[100000]"], "error: no eval length could be scored: the validation split is too short"),
        (["eval.passkey_lengths=[16]"], "error: eval.passkey_lengths holds 16: a passkey prompt needs at least"),
    ],
)
def test_bad_input_fails_with_one_clear_message(trained, tmp_path, args, message):
    workdir = trained[0]
    (tmp_path / "empty").mkdir()
    args = [a.format(empty=tmp_path / "empty") for a in args]
    extra = [] if any(a.startswith("eval.checkpoint") for a in args) else [f"eval.checkpoint={workdir / 'alibi'}"]
    proc = run_pretrain(
        ["stage=eval", f"run_dir={tmp_path / 'out'}", *SMALL_RUN, *extra, *args], cwd=workdir, check=False
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message.format(empty=tmp_path / "empty") in proc.stderr
    assert "Traceback" not in proc.stderr


def test_eval_without_trained_weights_says_what_to_do(trained, tmp_path):
    proc = run_pretrain(["stage=eval", f"run_dir={tmp_path / 'fresh'}", *SMALL_RUN], cwd=trained[0], check=False)
    assert proc.returncode == 2
    assert "error: no trained weights in" in proc.stderr and "eval.checkpoint=PATH" in proc.stderr


def test_stage_all_refuses_eval_lengths_a_group_cannot_split_before_training(tmp_path):
    proc = run_pretrain(
        ["stage=all", f"run_dir={tmp_path / 'run'}", *SMALL_RUN, "parallel=ulysses2", "eval.lengths=[32,33]"],
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: eval.lengths holds 33: with each window split over 2 ranks" in proc.stderr
    assert "for 33 use 32 or 34" in proc.stderr
    assert not (tmp_path / "run" / "train").exists() and not (tmp_path / "data").exists()  # nothing started
