"""The passkey generator puts the key at the stated depth and length; scoring reads greedy and likelihood right."""

from __future__ import annotations

import random

import pytest
import torch

from pretrain.eval.passkey import (
    FILLER,
    answer_text,
    distractor_keys,
    make_prompt,
    min_length,
    random_key,
    score_candidates,
    trial_rng,
)


def char_encode(text: str) -> list[int]:
    """A character-level tokenizer: every token decodes to one character."""
    return [ord(c) for c in text]


def char_decode(ids: list[int]) -> str:
    return "".join(map(chr, ids))


@pytest.fixture(scope="module")
def spm_encode(tmp_path_factory):
    """A small real sentencepiece tokenizer (the project's settings: digits split one per token)."""
    import sysconfig
    from pathlib import Path

    from pretrain.data.tokenizer import load_tokenizer, train_tokenizer

    texts = [p.read_text(errors="replace") for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("[a-d]*.py"))]
    path = train_tokenizer(texts, tmp_path_factory.mktemp("spm") / "spm", vocab_size=600)
    return load_tokenizer(path).encode


@pytest.mark.parametrize("length", [200, 257, 1000, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_key_is_at_the_stated_depth_and_the_prompt_has_the_stated_length(length, depth):
    key = "40376"
    prompt = make_prompt(char_encode, length, depth, key)
    assert len(prompt.tokens) + len(prompt.answer) == length
    text = char_decode(prompt.tokens)
    assert text.startswith("There is a pass key hidden") and text.endswith("What is the pass key? The pass key is")
    assert char_decode(prompt.answer) == " 40376"
    # The key's tokens sit where the prompt says, inside the key line, twice.
    at = prompt.key_position
    assert prompt.tokens[at : at + len(prompt.answer)] == prompt.answer
    assert text[prompt.key_line_start :].startswith("\nThe pass key is 40376. Remember it. 40376 is the pass key.\n")
    assert text.count(key) == 2
    # Depth: the key line starts at the filler sentence boundary nearest to depth x filler, so within half
    # the longest sentence of the asked token.
    asked = prompt.filler_start + depth * prompt.filler_tokens
    longest = max(len(s) for s in FILLER)
    assert abs(prompt.key_line_start - asked) <= longest / 2 + 1
    if depth == 0.0:
        assert prompt.key_line_start == prompt.filler_start
    if depth == 1.0:
        assert text[prompt.key_line_start :].index("\nWhat is the pass key?") == len(
            "\nThe pass key is 40376. Remember it. 40376 is the pass key.\n"
        )
    # Around the key line, the filler is the filler sentences cycled, cut to fit.
    key_line = "\nThe pass key is 40376. Remember it. 40376 is the pass key.\n"
    filler = text[prompt.filler_start : prompt.key_line_start] + text[prompt.key_line_start + len(key_line) :]
    filler = filler[: -len("\nWhat is the pass key? The pass key is")]
    assert len(filler) == prompt.filler_tokens
    assert filler == ("".join(FILLER) * length)[: prompt.filler_tokens]


def test_depth_moves_the_key_monotonically_across_the_filler():
    positions = [make_prompt(char_encode, 2000, d / 20, "12345").key_position for d in range(21)]
    assert positions == sorted(positions) and positions[0] < positions[-1]
    # Spread over the filler: 0.5 is near the middle of it.
    middle = make_prompt(char_encode, 2000, 0.5, "12345")
    assert abs(middle.key_offset / middle.filler_tokens - 0.5) < 0.02


@pytest.mark.parametrize("length, depth", [(150, 0.0), (150, 0.5), (700, 0.33), (2048, 1.0)])
def test_real_tokenizer_prompts_have_the_exact_length_and_the_key_tokens(spm_encode, length, depth):
    key = "90817"
    prompt = make_prompt(spm_encode, length, depth, key)
    assert len(prompt.tokens) + len(prompt.answer) == length
    assert prompt.answer == spm_encode(" 90817")
    at = prompt.key_position
    assert prompt.tokens[at : at + len(prompt.answer)] == prompt.answer
    asked = prompt.filler_start + depth * prompt.filler_tokens
    assert abs(prompt.key_line_start - asked) <= max(len(spm_encode(s)) for s in FILLER)


def test_too_short_a_length_is_refused(spm_encode):
    shortest = min_length(spm_encode)
    make_prompt(spm_encode, shortest, 0.5, "99999")
    with pytest.raises(ValueError, match="too short"):
        make_prompt(spm_encode, shortest - 1, 0.5, "99999")


def test_trials_are_seeded_and_distractors_are_distinct_keys_of_equal_token_count(spm_encode):
    rng = trial_rng(7, 512, 1, 3)
    key = random_key(rng)
    keys = distractor_keys(spm_encode, rng, key, 9)
    assert len(set(keys)) == 9 and key not in keys
    assert all(len(k) == 5 and k.isdigit() for k in [key, *keys])
    assert {len(spm_encode(answer_text(k))) for k in keys} == {len(spm_encode(answer_text(key)))}
    again = trial_rng(7, 512, 1, 3)
    assert random_key(again) == key and distractor_keys(spm_encode, again, key, 9) == keys
    assert random_key(trial_rng(7, 512, 1, 4)) != key or random_key(trial_rng(8, 512, 1, 3)) != key


def test_scoring_reads_likelihood_and_greedy_from_the_logits():
    vocab = 16
    prompt, answers = [1, 2, 3], [[5, 6], [7, 8], [5, 9]]

    def logits_fn(preferred):
        def fn(ids):
            assert ids.shape == (3, len(prompt) + 1)
            logits = torch.zeros(ids.shape[0], 2, vocab)
            logits[:, 0, preferred[0]] = 5.0
            logits[:, 1, preferred[1]] = 5.0
            return logits

        return fn

    scores, greedy = score_candidates(logits_fn((5, 6)), prompt, answers)
    assert greedy and scores[0] > scores[1:].max()
    scores, greedy = score_candidates(logits_fn((5, 9)), prompt, answers)
    assert not greedy and scores[2] > scores[0] > scores[1]
    # A random model: likelihood ties are not counted as recovered keys (strictly greater is required).
    flat, greedy = score_candidates(lambda ids: torch.zeros(ids.shape[0], 2, vocab), prompt, answers)
    assert not bool(flat[0] > flat[1:].max())


def test_random_keys_are_five_digits():
    rng = random.Random(0)
    keys = [random_key(rng) for _ in range(200)]
    assert all(len(k) == 5 and k[0] != "0" for k in keys) and len(set(keys)) > 190
