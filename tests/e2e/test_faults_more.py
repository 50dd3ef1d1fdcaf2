"""More faults a user meets, injected into real runs of the command line (issue 21, second round): a checkpoint
corrupted twice at the same step, a swapped tokenizer at export and at ``train.init_from=<run>/hf``, weights whose
checksum file is gone or whose config was edited, sizes that cannot fit, and the leftovers of a killed export.

Every refusal is one line (``error: ...``) naming the value and what to do; none leaves a traceback. All tests share
one 6-step run (checkpoints at 2, 4 and 6) and work on copies of it.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from cli import SMALL_RUN, metrics, refusal, run_pretrain
from safetensors.torch import load_file, save_file

RUN = [*SMALL_RUN, "model=tiny"]
TRAIN = ["stage=train", *RUN, "train.max_steps=6", "train.ckpt_every=2"]
# The same corpus with another tokenizer of the same size (trained on another sample of the text).
OTHER_TOKENIZER = [arg for arg in RUN if not arg.startswith("data.tokenizer_sample_chars=")]
OTHER_TOKENIZER.append("data.tokenizer_sample_chars=200000")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``(workdir, run_dir)``: a 6-step run, exported; and a prepared corpus with another tokenizer of the same size."""
    workdir = tmp_path_factory.mktemp("faults_more")
    run_dir = workdir / "run"
    run_pretrain([f"run_dir={run_dir}", *TRAIN], cwd=workdir)
    run_pretrain([f"run_dir={workdir / 'other'}", "stage=prepare", *OTHER_TOKENIZER], cwd=workdir)
    return workdir, run_dir


def copy(run_dir, tmp_path, name="run"):
    target = tmp_path / name
    shutil.copytree(run_dir, target)
    return target


def flip_bytes(path, count=64):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
    path.write_bytes(bytes(data))


def test_the_same_checkpoint_corrupted_twice_and_a_damaged_record_are_fallen_back_past(trained, tmp_path):
    workdir, run_dir = trained
    victim = copy(run_dir, tmp_path)
    checkpoints = victim / "checkpoints"
    flip_bytes(checkpoints / "step_00000006" / "mp_rank_00_model_states.pt")
    first = run_pretrain([f"run_dir={victim}", *TRAIN], cwd=workdir)
    assert "skipping checkpoint step_00000006" in first.stdout and "kept as step_00000006.corrupt " in first.stdout
    assert (checkpoints / "step_00000006" / "complete.json").is_file()  # saved again after the resume
    # The same step again, now with its completion record torn (a kill while a disk was failing).
    (checkpoints / "step_00000006" / "complete.json").write_text('{"step": 6, "checks')
    second = run_pretrain([f"run_dir={victim}", *TRAIN], cwd=workdir)
    assert "skipping checkpoint step_00000006" in second.stdout and "complete.json" in second.stdout
    assert "kept as step_00000006.corrupt-2" in second.stdout
    assert f"{checkpoints / 'step_00000004'} at step 4" in second.stdout
    assert (checkpoints / "step_00000006.corrupt").is_dir() and (checkpoints / "step_00000006.corrupt-2").is_dir()
    assert (checkpoints / "latest").read_text().strip() == "step_00000006"
    assert [row["step"] for row in metrics(victim)] == list(range(1, 7))


def test_export_refuses_a_tokenizer_other_than_the_one_the_weights_were_trained_with(trained, tmp_path):
    workdir, run_dir = trained
    victim = copy(run_dir, tmp_path)
    other = workdir / "other" / "tokenizer" / "spm.model"
    assert other.read_bytes() != (victim / "tokenizer" / "spm.model").read_bytes()
    shutil.copyfile(other, victim / "tokenizer" / "spm.model")
    line = refusal(run_pretrain([f"run_dir={victim}", "stage=export", *RUN], cwd=workdir, check=False))
    assert f"{victim / 'tokenizer' / 'spm.model'} (SHA-256 " in line and "is not the one the weights in" in line
    assert not (victim / "hf").exists()


def test_an_export_killed_while_replacing_hf_is_put_back_and_leaves_nothing_behind(trained, tmp_path):
    workdir, run_dir = trained
    victim = copy(run_dir, tmp_path)
    previous = victim / ".hf.old-99999"  # a previous export moved aside by an export killed before its second rename
    previous.mkdir()
    (previous / "config.json").write_text("{}")
    (victim / ".hf.old-99998").mkdir()  # older leftovers
    (victim / ".hf.tmp-99997").mkdir()
    proc = run_pretrain([f"run_dir={victim}", "stage=export", *RUN], cwd=workdir)
    assert f"[export] put back {victim / 'hf'}" in proc.stdout
    assert sorted(p.name for p in victim.glob(".hf*")) == [] and (victim / "hf" / "tokenizer.json").is_file()


def test_init_from_an_export_checks_its_tokenizer_and_refuses_non_float_tensors(trained, tmp_path):
    workdir, run_dir = trained
    source = copy(run_dir, tmp_path, "source")
    run_pretrain([f"run_dir={source}", "stage=export", *RUN], cwd=workdir)
    hf = source / "hf"
    new = ["stage=train", "train.max_steps=1", f"train.init_from={hf}"]
    line = refusal(run_pretrain([f"run_dir={tmp_path / 'a'}", *new, *OTHER_TOKENIZER], cwd=workdir, check=False))
    assert f"train.init_from='{hf}' was trained with another tokenizer" in line, line
    state = load_file(str(hf / "model.safetensors"))
    name = "transformer.h.0.mlp.dense_h_to_4h.weight"
    state[name] = state[name].clamp(-1, 1).mul(127).to(torch.int8)  # "quantized"
    save_file(state, str(hf / "model.safetensors"), metadata={"format": "pt"})
    line = refusal(run_pretrain([f"run_dir={tmp_path / 'b'}", *new, *RUN], cwd=workdir, check=False))
    assert "weight h.0.mlp.dense_h_to_4h.weight in " in line and "is int8, not floating point" in line, line


def test_weights_without_their_checksum_or_with_another_config_are_refused(trained, tmp_path):
    workdir, run_dir = trained
    victim = copy(run_dir, tmp_path)
    weights = victim / "checkpoints"
    eval_args = [f"run_dir={victim}", "stage=eval", *RUN, "eval.lengths=[32]", "eval.passkey=false"]
    (weights / "model.safetensors.sha256").unlink()
    line = refusal(run_pretrain(eval_args, cwd=workdir, check=False))
    assert "has no checksum file model.safetensors.sha256" in line and "sha256sum model.safetensors" in line
    (weights / "model.safetensors.sha256").write_text(
        (run_dir / "checkpoints" / "model.safetensors.sha256").read_text()
    )
    config = json.loads((weights / "model_config.json").read_text())
    (weights / "model_config.json").write_text(json.dumps({**config, "n_head": 8}))
    line = refusal(run_pretrain(eval_args, cwd=workdir, check=False))
    assert "model_config.json says n_head=8, but the weights beside it were saved with n_head=4" in line, line


def test_sizes_that_cannot_fit_are_one_line_before_any_work(trained, tmp_path):
    workdir, run_dir = trained
    victim = copy(run_dir, tmp_path)
    generate = [f"run_dir={victim}", "stage=generate", *RUN]
    line = refusal(run_pretrain([*generate, "generate.prompt=def", "generate.max_new_tokens=1000000000"],
                                cwd=workdir, check=False))  # fmt: skip
    assert line.startswith("error: generate.max_new_tokens=1,000,000,000 cannot fit:") and "at most" in line, line
    line = refusal(run_pretrain([f"run_dir={victim}", "stage=eval", *RUN, "eval.passkey_lengths=[100000000]"],
                                cwd=workdir, check=False))  # fmt: skip
    assert line.startswith("error: eval.passkey_lengths holds 100,000,000:") and "at most" in line, line
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f(x):\n" + "x = 1 + 2; " * 100_000 + "\n")  # a 1 MB line
    line = refusal(run_pretrain([*generate, f"generate.prompt_file={prompts}"], cwd=workdir, check=False))
    assert "prompt 2 of 2" in line and "more than generate.max_prompt_tokens=32,768" in line, line
    assert not (victim / "generate").exists()
