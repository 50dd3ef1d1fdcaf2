"""What the harness stage makes of lm-eval's results: the rows, the console table, the model card's section (replaced,
never doubled), wandb's keys, the input lengths past the training length, the task hashes and the comparison of runs."""

import json

import pytest

from pretrain.errors import PipelineError
from pretrain.harness.compare import compare_paths, compare_table, read_report
from pretrain.harness.results import (
    CARD_BEGIN,
    CARD_END,
    card_section,
    format_table,
    input_lengths,
    length_lines,
    metric_rows,
    task_hashes,
    wandb_metrics,
    with_card_section,
)

# The shape of lm-eval 0.4's simple_evaluate results (trimmed).
LM_RESULTS = {
    "results": {
        "arc_easy": {
            "alias": "arc_easy",
            "acc,none": 0.25,
            "acc_stderr,none": 0.0433,
            "acc_norm,none": 0.3,
            "acc_norm_stderr,none": 0.05,
        },
        "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.0, "exact_match_stderr,strict-match": "N/A"},
    },
    "n-shot": {"arc_easy": 0, "gsm8k": 5},
    "n-samples": {"arc_easy": {"original": 2376, "effective": 100}, "gsm8k": {"original": 1319, "effective": 10}},
    "higher_is_better": {"arc_easy": {"acc": True, "acc_norm": True}, "gsm8k": {"exact_match": True}},
    "versions": {"arc_easy": 1.0, "gsm8k": 3.0},
}


def report(**settings) -> dict:
    return {
        "rows": metric_rows(LM_RESULTS),
        "settings": {"num_fewshot": None, "limit": None, "seed": 1234, "max_length": None, **settings},
        "versions": {"lm_eval": "0.4.13"},
        "date": "2026-12-04T20:00:00Z",
        "model": {"hf": "/runs/a/hf", "train_seq_len": 32},
        "checkpoint": {"weights": "/runs/a/checkpoints"},
        "task_hashes": {"arc_easy": "a" * 64, "gsm8k": "b" * 64},
        "lengths": {"arc_easy": {"requests": 400, "longest": 70, "over_train_length": 12, "cut": 0}},
    }


def test_rows_pair_each_score_with_its_stderr():
    rows = {(r["task"], r["metric"], r["filter"]): r for r in metric_rows(LM_RESULTS)}
    assert set(rows) == {
        ("arc_easy", "acc", "none"),
        ("arc_easy", "acc_norm", "none"),
        ("gsm8k", "exact_match", "strict-match"),
    }
    acc = rows[("arc_easy", "acc", "none")]
    assert (acc["value"], acc["stderr"], acc["n_shot"], acc["examples"], acc["higher_is_better"]) == (
        0.25,
        0.0433,
        0,
        100,
        True,
    )
    assert rows[("gsm8k", "exact_match", "strict-match")]["stderr"] is None  # lm-eval's "N/A"


def test_console_table_and_wandb_keys():
    table = format_table(report(limit=100))
    assert "arc_easy" in table and "0.2500" in table and "0.0433" in table and "exact_match/strict-match" in table
    assert "limit: 100 examples per task (not comparable" in table
    assert wandb_metrics(report()) == {
        "harness/arc_easy/acc": 0.25,
        "harness/arc_easy/acc_stderr": 0.0433,
        "harness/arc_easy/acc_norm": 0.3,
        "harness/arc_easy/acc_norm_stderr": 0.05,
        "harness/gsm8k/exact_match/strict-match": 0.0,
    }


def test_the_card_section_is_appended_once_then_replaced():
    card = "# Model\n\nText.\n"
    once = with_card_section(card, card_section(report()))
    assert once.startswith(card) and once.count(CARD_BEGIN) == 1 and once.count(CARD_END) == 1
    assert "| arc_easy | 0 | acc | 0.2500 | 0.0433 | 100 |" in once
    assert "arc_easy: 12 of 400 inputs are longer than the training length 32" in once
    twice = with_card_section(once + "\n## After\n", card_section(report(limit=5)))
    assert twice.count(CARD_BEGIN) == 1 and "limit 5 examples per task" in twice and twice.endswith("## After\n")


def test_input_lengths_count_what_the_model_reads():
    samples = {
        "mc": [{"arguments": [["ab", "c"], ["ab", "cd"]]}],
        "rolling": [{"arguments": [["abcdef"]]}],
        "gen": [{"arguments": [["abcd", {"until": ["\n"]}]]}],
    }
    types = {"mc": "multiple_choice", "rolling": "loglikelihood_rolling", "gen": "generate_until"}
    lengths = input_lengths(samples, types, lambda texts: [len(t) for t in texts], train_len=3, max_length=5)
    # context + continuation minus the predicted last token; a rolling text read whole after its prefix token
    assert lengths["mc"] == {"requests": 2, "longest": 3, "over_train_length": 0, "cut": 0}
    assert lengths["rolling"] == {"requests": 1, "longest": 6, "over_train_length": 1, "cut": 1}
    assert lengths["gen"]["longest"] == 4
    lines = length_lines({"model": {"train_seq_len": 3}, "settings": {"max_length": 5}, "lengths": lengths})
    assert lines == [
        "rolling: 1 of 1 inputs are longer than the training length 3 (longest 6 tokens); 1 were cut from the "
        "left to 5 tokens (max_length)",
        "gen: 1 of 1 inputs are longer than the training length 3 (longest 4 tokens), scored at their full "
        "length (ALiBi)",
    ]


def test_task_hashes_are_lm_evals_own():
    hash_string = pytest.importorskip("lm_eval.utils").hash_string
    samples = {
        "t": [
            {"doc_hash": "d1", "prompt_hash": "p1", "target_hash": "t1"},
            {"doc_hash": "d2", "prompt_hash": "p2", "target_hash": "t2"},
        ]
    }
    assert task_hashes(samples) == {"t": hash_string("d1p1t1d2p2t2")}


def test_compare_puts_runs_side_by_side_and_marks_what_does_not_compare():
    other = report(num_fewshot=5)
    other["rows"] = [dict(r, value=r["value"] + 0.1 if r["value"] is not None else None) for r in other["rows"]]
    other["task_hashes"] = {"arc_easy": "c" * 64, "gsm8k": "b" * 64}
    table = compare_table([("a", report()), ("a", other)])
    lines = table.splitlines()
    assert lines[0] == "| task | metric | a (1) | a (2) |"
    assert "| arc_easy | acc ↑ | 0.2500 ± 0.0433 | 0.3500 ± 0.0433 † |" in lines
    assert "| gsm8k | exact_match/strict-match ↑ | 0.0000 | 0.1000 |" in lines
    assert any(line.startswith("† not scored like the first run's column") for line in lines)


def test_compare_paths_are_checked_before_any_work(tmp_path):
    from pretrain.config import Config, HarnessConfig

    (tmp_path / "good" / "eval").mkdir(parents=True)
    (tmp_path / "good" / "eval" / "harness.json").write_text(json.dumps(report()))
    cfg = Config(harness=HarnessConfig(compare=[str(tmp_path / "good")]))
    assert read_report(compare_paths(cfg)[0])["rows"]
    cfg = Config(harness=HarnessConfig(compare=[str(tmp_path / "good"), str(tmp_path / "none")]))
    with pytest.raises(PipelineError, match="has no lm-evaluation-harness results") as err:
        compare_paths(cfg)
    assert "\n" not in str(err.value)
