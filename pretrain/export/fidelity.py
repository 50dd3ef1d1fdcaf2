"""How closely the exported transformers class computes our model: logits at 1x and 8x the training length.

For an exact format (BLOOM, MPT) the tests hold the difference to float32 rounding; a format whose class rounds
(Falcon's bfloat16 ALiBi bias) is measured at every export on validation tokens, and the numbers go into the model
card: the largest logit difference, how often the most likely next token agrees, and the loss each gives.
"""

from __future__ import annotations

import math

import torch

from pretrain.config import ModelConfig
from pretrain.extras import optional_import
from pretrain.model.hf_formats import HfFormat

MULTIPLES = (1, 8)


def hf_model(fmt: HfFormat, config_dict: dict, tensors: dict):
    """The transformers model of an export, built in this process from its ``config.json`` and tensors (float32)."""
    transformers = optional_import("transformers", "measuring how closely the exported class computes the model")

    config = transformers.AutoConfig.for_model(**{k: v for k, v in config_dict.items() if k != "architectures"})
    config.dtype = torch.float32
    model = getattr(transformers, fmt.architecture)(config)
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    model.tie_weights()
    return model.eval()


@torch.no_grad()
def compare_logits(ours, theirs, ids: torch.Tensor) -> dict:
    """Our model's and the class's logits on ``ids`` ``[1, L]``: max |difference|, top-1 agreement, and the loss of
    each on the next tokens."""
    a, b = ours(ids).float(), theirs(ids).logits.float()
    targets = ids[0, 1:]
    loss = [torch.nn.functional.cross_entropy(x[0, :-1], targets).item() for x in (a, b)]
    return {
        "tokens": ids.shape[1],
        "max_abs_logit_diff": (a - b).abs().max().item(),
        "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        "loss": loss[0],
        "loss_hf": loss[1],
        "ppl_rel_diff": math.exp(loss[1] - loss[0]) - 1.0,
    }


def measure(model_cfg: ModelConfig, state: dict, fmt: HfFormat, config_dict: dict, tensors: dict, tokens) -> list[dict]:
    """``compare_logits`` at each of ``MULTIPLES`` x the training length, on ``tokens`` (a 1-D id tensor, as long as
    the longest; random ids when None), one row per length."""
    from pretrain.model.gpt import GPT

    ours = GPT(model_cfg)
    ours.load_state_dict({k: v.float() for k, v in state.items()})
    ours.eval()
    theirs = hf_model(fmt, config_dict, tensors)
    longest = max(MULTIPLES) * model_cfg.seq_len
    if tokens is None or len(tokens) < longest:
        tokens = torch.randint(0, model_cfg.vocab_size, (longest,), generator=torch.Generator().manual_seed(0))
    rows = []
    for multiple in MULTIPLES:
        ids = torch.as_tensor(tokens[: multiple * model_cfg.seq_len], dtype=torch.int64)[None]
        rows.append({"multiple": multiple, **compare_logits(ours, theirs, ids)})
    return rows


@torch.no_grad()
def perplexity_by_length(ours, theirs, tokens: torch.Tensor, lengths, max_tokens: int = 8192) -> list[dict]:
    """Perplexity of our model and of the class on non-overlapping windows of each length of ``tokens`` (1-D), up to
    ``max_tokens`` predictions per length: how far the class's rounding moves the numbers an evaluation reports."""
    rows = []
    for length in lengths:
        count = max(1, min(max_tokens // length, (len(tokens) - 1) // length))
        sums, agree, worst, n = [0.0, 0.0], 0, 0.0, 0
        for w in range(count):
            ids = torch.as_tensor(tokens[w * length : (w + 1) * length + 1], dtype=torch.int64)[None]
            a, b = ours(ids[:, :-1]).float(), theirs(ids[:, :-1]).logits.float()
            for i, x in enumerate((a, b)):
                sums[i] += torch.nn.functional.cross_entropy(x[0], ids[0, 1:], reduction="sum").item()
            agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
            worst = max(worst, (a - b).abs().max().item())
            n += length
        ppl, ppl_hf = math.exp(sums[0] / n), math.exp(sums[1] / n)
        rows.append(
            {
                "length": length,
                "tokens": n,
                "ppl": ppl,
                "ppl_hf": ppl_hf,
                "ppl_rel_diff": ppl_hf / ppl - 1.0,
                "top1_agreement": agree / n,
                "max_abs_logit_diff": worst,
            }
        )
    return rows
