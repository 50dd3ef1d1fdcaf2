"""The three transformers classes an export can be: each built in this process from our state dict gives our logits
(float32) at 1x and 8x the training length and our greedy tokens; what none represents is one line."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from pretrain.config import ModelConfig
from pretrain.errors import ConfigError
from pretrain.export.fidelity import hf_model
from pretrain.model.gpt import GPT
from pretrain.model.hf_formats import choose_format
from pretrain.model.kv_cache import KVCache
from pretrain.model.mpt import _mpt_slopes
from pretrain.ops.alibi import slopes
from pretrain.parallel.distributed import DistContext

transformers = pytest.importorskip("transformers")

# The hand-made run directory of the export stage's own tests (test modules are imported by path, not by name).
_spec = importlib.util.spec_from_file_location("export_run_tests", Path(__file__).with_name("test_export_run.py"))
_export_run_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_export_run_tests)
VOCAB, config, make_run = _export_run_tests.VOCAB, _export_run_tests.config, _export_run_tests.make_run
spm_model = _export_run_tests.spm_model  # a fixture

SEQ_LEN = 32
MPT = dict(bias=False, embedding_layernorm=False, mlp="gelu")  # the model=mpt-125m block
FALCON_MQA = dict(n_kv_head=1, alibi_slopes="falcon", embedding_layernorm=False)
# (format, overrides): 6 heads, slopes of a head count that is not a power of two.
CASES = [
    ("bloom", {}),
    ("mpt", MPT),
    ("falcon", FALCON_MQA),
    ("falcon", dict(alibi_slopes="falcon", embedding_layernorm=False, bias=False, mlp="gelu")),
    # grouped-query attention in Falcon's new_decoder_architecture: the parallel block
    ("falcon", dict(n_kv_head=2, parallel_block=True, alibi_slopes="falcon", embedding_layernorm=False)),
]


def build(overrides):
    cfg = ModelConfig(n_layer=2, n_head=6, d_model=48, seq_len=SEQ_LEN, vocab_size=VOCAB, init_std=0.1, **overrides)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    fmt = choose_format(cfg)
    tensors = fmt.state_dict(model.state_dict(), cfg)
    return model, fmt, hf_model(fmt, fmt.config(cfg), tensors)


@pytest.mark.parametrize("name, overrides", CASES, ids=lambda c: c if isinstance(c, str) else ",".join(c))
def test_each_class_gives_our_logits_at_1x_and_8x(name, overrides):
    model, fmt, hf = build(overrides)
    assert fmt.name == name and type(hf).__name__ == fmt.architecture
    for length in (SEQ_LEN, 8 * SEQ_LEN):  # Falcon's bf16 bias is still exact below 256 positions
        ids = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            assert (hf(ids).logits - model(ids)).abs().max().item() <= 1e-5, (name, length)


@torch.no_grad()
@pytest.mark.parametrize(
    "name, overrides", [*CASES[:3], CASES[-1]], ids=lambda c: c if isinstance(c, str) else ",".join(c)
)
def test_greedy_tokens_equal_transformers_generate(name, overrides):
    model, _, hf = build(overrides)
    prompt = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 12:]
    cache = KVCache.for_model(model, 1)
    logits = model.forward_cached(prompt, cache, last_only=True)
    ours = []
    for _ in range(12):
        ours.append(int(logits[0, -1].argmax()))
        logits = model.forward_cached(torch.tensor([[ours[-1]]]), cache)
    assert ours == theirs.tolist()


def test_mpt_slopes_are_ours_for_every_head_count():
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    for n in range(1, 65):
        theirs = build_mpt_alibi_tensor(n, 2)[:, 0, 0].neg()  # the bias of the key one before the last: -slope
        assert torch.allclose(theirs, slopes(n), rtol=1e-6, atol=0), n
        assert torch.allclose(torch.tensor(_mpt_slopes(n), dtype=torch.float32), slopes(n), rtol=1e-6, atol=0), n


@pytest.mark.parametrize(
    "overrides, requested, message",
    [
        (dict(mlp="swiglu"), "auto", "model.mlp=swiglu: no transformers class has SwiGLU with ALiBi"),
        (
            dict(n_kv_head=2, alibi_slopes="falcon", embedding_layernorm=False),
            "auto",
            "Falcon: model.n_kv_head=2 .*new_decoder_architecture",
        ),
        (dict(n_kv_head=2), "auto", "BLOOM: model.n_kv_head=2 .*MPT: model.bias=true"),
        (MPT, "bloom", "export.format=bloom: .*model.bias=false .*export.format=mpt \\(or auto\\) represents it"),
        (dict(n_kv_head=1, embedding_layernorm=False), "falcon", "model.alibi_slopes=paper \\(Falcon divides"),
    ],
)
def test_what_no_class_represents_is_one_line(overrides, requested, message):
    cfg = ModelConfig(n_layer=2, n_head=6, d_model=48, vocab_size=VOCAB, **overrides)
    with pytest.raises(ConfigError, match=message) as err:
        choose_format(cfg, requested)
    assert "\n" not in str(err.value)


def test_mpt_and_falcon_exports_load_with_auto_classes(tmp_path, spm_model):
    for name, overrides in (("mpt", MPT), ("falcon", FALCON_MQA)):
        run, model = make_run(tmp_path / name, spm_model, **overrides)
        lines = []
        hf_dir = run_export_quiet(config(run, tmp_path), lines)
        cfg = json.loads((hf_dir / "config.json").read_text())
        assert cfg["model_type"] == name
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
        ids = torch.randint(0, VOCAB, (1, SEQ_LEN))
        with torch.no_grad():
            assert (hf(ids).logits - model(ids)).abs().max().item() <= 1e-5
        card = (hf_dir / "README.md").read_text()
        assert transformers.AutoTokenizer.from_pretrained(hf_dir)("def f(x):").input_ids
        if name == "falcon":
            assert any("warning: transformers' Falcon rounds its ALiBi bias to bfloat16" in line for line in lines)
            assert "## How closely the transformers class computes this model" in card
            assert f"| {8 * SEQ_LEN} |" in card
        else:
            assert "How closely" not in card and "MptForCausalLM" in card


def run_export_quiet(cfg, lines):
    from pretrain.export.run import run_export

    return run_export(cfg, DistContext(), say=lines.append)


def test_mpt_sequence_length_limit_covers_the_evaluation():
    cfg = ModelConfig(seq_len=128, **MPT)
    assert choose_format(cfg).config(cfg)["max_seq_len"] >= 32 * 128
    assert math.isclose(choose_format(cfg).config(cfg)["max_seq_len"], 8192)
