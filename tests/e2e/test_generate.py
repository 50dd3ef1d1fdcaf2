"""The generate stage through the real command line, and its benchmark on tiny sizes (no timing assertions)."""

from __future__ import annotations

import json

import pytest
import torch
from cli import SMALL_RUN, run_bench, run_pretrain

from pretrain.data.tokenizer import load_tokenizer
from pretrain.model.gpt import GPT
from pretrain.train.weights import load_weights

PROMPTS = ["def main():", "    for name in sorted(names):"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("generate")
    run_dir = workdir / "run"
    run_pretrain(["stage=train", f"run_dir={run_dir}", *SMALL_RUN, "train.max_steps=30"], cwd=workdir)
    return workdir, run_dir


def test_generate_prints_and_writes_the_completions(trained):
    workdir, run_dir = trained
    prompt_file = workdir / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")
    new = 48  # with the prompts, well past the training length of 32
    args = ["stage=generate", f"run_dir={run_dir}", *SMALL_RUN, f"generate.prompt_file={prompt_file}"]
    proc = run_pretrain([*args, f"generate.max_new_tokens={new}", "generate.temperature=0"], cwd=workdir)
    samples = [json.loads(line) for line in (run_dir / "generate" / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == PROMPTS
    sp = load_tokenizer(run_dir / "tokenizer" / "spm.model")
    model_cfg, state = load_weights(run_dir / "checkpoints")
    model = GPT(model_cfg).eval()
    model.load_state_dict(state)
    for sample in samples:
        assert set(sample) == {"prompt", "text", "token_ids"}
        ids = sample["token_ids"]
        assert 0 < len(ids) <= new and sample["text"] == sp.decode(ids)
        assert sample["text"] in proc.stdout
        # Greedy through the stage's cache = greedy by a full forward over the prefix each step, no <s> in front.
        prefix = sp.encode(sample["prompt"])
        with torch.no_grad():
            for token in ids:
                assert int(model(torch.tensor([prefix]))[0, -1].argmax()) == token
                prefix.append(token)
            if len(ids) < new:  # it stopped at </s>
                assert int(model(torch.tensor([prefix]))[0, -1].argmax()) == sp.eos_id()
    assert "[generate] 2 prompt(s)" in proc.stdout


def test_generate_without_a_prompt_is_one_line(trained):
    workdir, run_dir = trained
    proc = run_pretrain(["stage=generate", f"run_dir={run_dir}", *SMALL_RUN], cwd=workdir, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        'error: stage=generate needs a prompt: give generate.prompt="TEXT" or generate.prompt_file=PATH '
        "(one prompt a line)"
    ]


def test_generate_bench_writes_its_rows(tmp_path):
    out = tmp_path / "generate.json"
    proc = run_bench(
        "generate", "--prompt", "96", "--new", "6", "--full-new", "2", "--vocab", "512", "--threads", "1",
        "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["benchmark"] == "generate" and report["params"]["prompt"] == 96
    rows = report["rows"]
    assert [r["impl"] for r in rows] == ["cache", "full", "transformers"]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["same_tokens_as_cache"] is True
    assert rows[0]["cache_speedup"] == 1.0 and rows[0]["prefill_s"] > 0 and rows[0]["cache_mib"] > 0
    assert [c["status"] for c in report["checks"]] == ["SKIP"]  # a prompt below 2,048
    assert "end-to-end tok/s" in proc.stdout
