"""Weighted mixtures (data=mix): the sources' config checks, the loader's draws by weight and its exact resume, the
per-source validation, and what a prepared mixture holds."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from data_fixtures import data_config

from pretrain.config import DataConfig
from pretrain.data.loader import MixtureLoader, TokenWindowLoader, ValidationSplits, train_loader
from pretrain.data.prepare import prepare_corpus
from pretrain.errors import ConfigError

SEQ = 8
# Source i's shard holds the tokens i * BASE + position, so a window's first input names its source and place.
BASE = 100_000


@pytest.fixture
def shards(tmp_path):
    paths = []
    for index, size in enumerate((4000, 900, 3000)):
        path = tmp_path / f"s{index}.bin"
        (index * BASE + np.arange(size, dtype=np.uint32)).tofile(path)
        paths.append(path)
    return paths


def mixture(shards, weights, seed=3, micro=8, rank=0, size=1):
    sources = [(f"s{i}", path, w) for i, (path, w) in enumerate(zip(shards, weights, strict=True))]
    return MixtureLoader(sources, "uint32", SEQ, micro, seed, dp_rank=rank, dp_size=size)


def firsts(batch) -> list[int]:
    return batch[0][:, 0].tolist()


def take(loader, n) -> list[int]:
    return [s for _ in range(n) for s in firsts(loader.next_batch())]


def test_sampled_proportions_match_the_weights(shards):
    weights = [0.5, 0.3, 0.2]
    drawn = np.asarray(take(mixture(shards, weights), 600)) // BASE  # 4800 windows
    n = len(drawn)
    for source, weight in enumerate(weights):
        share = float(np.mean(drawn == source))
        assert abs(share - weight) < 4 * math.sqrt(weight * (1 - weight) / n), (source, share, weight)


def test_a_source_of_weight_zero_is_never_drawn(shards):
    drawn = np.asarray(take(mixture(shards, [1.0, 0.0, 3.0]), 100)) // BASE
    assert set(drawn.tolist()) == {0, 2}


def test_windows_are_shard_windows_and_a_source_epoch_repeats_none(shards):
    loader = mixture(shards, [0.0, 1.0, 0.0])  # only the 900-token source: 111 windows an epoch
    inputs, targets = loader.next_batch()
    assert inputs.shape == targets.shape == (8, SEQ) and inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1]) and torch.equal(
        targets[:, -1] - inputs[:, 0], torch.full((8,), SEQ)
    )
    n_windows = loader.streams[1].n_windows
    starts = [inputs[0, 0].item()] + [s for s in firsts((inputs, targets))[1:]] + take(loader, 40)
    epoch = starts[:n_windows]
    assert len(set(epoch)) == n_windows
    assert len({(s - BASE) % SEQ for s in epoch}) == 1  # one offset per epoch


def test_same_seed_same_stream_other_seed_other_stream(shards):
    assert take(mixture(shards, [1, 1, 1], seed=5), 20) == take(mixture(shards, [1, 1, 1], seed=5), 20)
    assert take(mixture(shards, [1, 1, 1], seed=5), 20) != take(mixture(shards, [1, 1, 1], seed=6), 20)


def test_resume_is_exact(shards):
    straight = mixture(shards, [0.6, 0.1, 0.3])
    want = take(straight, 30)
    first = mixture(shards, [0.6, 0.1, 0.3])
    got = take(first, 12)
    state = first.state_dict()
    second = mixture(shards, [0.6, 0.1, 0.3])
    second.load_state_dict(state)
    assert got + take(second, 18) == want


def test_another_number_of_ranks_sees_the_same_global_batches(shards):
    one = mixture(shards, [0.6, 0.1, 0.3], micro=8)
    want = [firsts(one.next_batch()) for _ in range(10)]
    two = [mixture(shards, [0.6, 0.1, 0.3], micro=4, rank=r, size=2) for r in range(2)]
    for step in range(5):  # 2 ranks x 4: rank r takes every 2nd window of the global batch of 8
        rank0, rank1 = (firsts(loader.next_batch()) for loader in two)
        assert want[step][0::2] == rank0 and want[step][1::2] == rank1
    # A state saved by two ranks restores one rank with twice the micro-batch (and back): the stream continues.
    resumed = mixture(shards, [0.6, 0.1, 0.3], micro=8)
    resumed.load_state_dict(two[0].state_dict())
    assert [firsts(resumed.next_batch()) for _ in range(5)] == want[5:]


def test_a_state_of_another_mixture_is_refused(shards):
    state = mixture(shards, [0.6, 0.1, 0.3]).state_dict()
    with pytest.raises(ValueError, match="other weights"):
        mixture(shards, [0.5, 0.2, 0.3]).load_state_dict(state)
    single = TokenWindowLoader(shards[0], "uint32", SEQ, 8, 3).state_dict()
    with pytest.raises(ValueError, match="not a mixture"):
        mixture(shards, [0.6, 0.1, 0.3]).load_state_dict(single)


def fake_corpus(shards, weights, tmp_path):
    sources = tuple(
        SimpleNamespace(label=f"s{i}", kind="files", weight=w, train=path, val=path, identity=f"s{i}")
        for i, (path, w) in enumerate(zip(shards, weights, strict=True))
    )
    return SimpleNamespace(sources=sources, dtype="uint32", train=None, val=None)


def test_train_loader_and_validation_splits_follow_the_corpus(shards, tmp_path):
    corpus = fake_corpus(shards, [3.0, 0.0, 1.0], tmp_path)
    assert isinstance(train_loader(corpus, SEQ, 4, seed=1), MixtureLoader)
    single = SimpleNamespace(
        sources=(), dtype="uint32", train=shards[0], val=shards[0], split_digest=lambda split: "single"
    )
    assert isinstance(train_loader(single, SEQ, 4, seed=1), TokenWindowLoader)

    def score(batches):  # the mean first token's source, to see which split was scored
        return float(np.mean([(b[0][:, 0] // BASE).float().mean() for b in batches]))

    loss, by_source = ValidationSplits(corpus, SEQ, 4, max_batches=2).losses(score)
    assert by_source == {"loss/s0": 0.0, "loss/s1": 1.0, "loss/s2": 2.0}
    assert loss == pytest.approx((3 * 0.0 + 1 * 2.0) / 4)  # weighted as training draws; weight 0 not counted
    assert ValidationSplits(single, SEQ, 4, max_batches=2).losses(score) == (0.0, {})


# ---------------------------------------------------------------- the config


def mix(*sources, **top) -> DataConfig:
    return DataConfig(source="mix", sources=list(sources), **top)


def test_sources_become_source_configs_with_labels():
    data = mix(
        {"kind": "stdlib", "weight": 1, "max_files": 3},
        {"kind": "files", "paths": "a/*.txt", "weight": 0.5},
        {"kind": "files", "paths": ["b/*.txt"], "weight": 2, "label": "long"},
        {"kind": "hf", "name": "HuggingFaceFW/fineweb-edu", "weight": 0},
    )
    assert [(s.label, s.kind, s.weight) for s in data.sources] == [
        ("stdlib", "stdlib", 1.0),
        ("files", "files", 0.5),
        ("long", "files", 2.0),
        ("fineweb-edu", "hf", 0.0),
    ]
    assert data.sources[1].paths == ["a/*.txt"]
    one = data.sources[0].as_data(data)
    assert (one.source, one.max_files, one.sources) == ("stdlib", 3, [])
    twice = mix({"kind": "files", "paths": ["a"], "weight": 1}, {"kind": "files", "paths": ["b"], "weight": 1})
    assert [s.label for s in twice.sources] == ["files-0", "files-1"]


@pytest.mark.parametrize(
    "sources, top, message",
    [
        ([], {}, r"data=mix needs data.sources=\[\{kind"),
        (
            [{"kind": "stdlib", "weight": -0.5}],
            {},
            r"data.sources\[0\].weight=-0.5 is not allowed; a weight is a number >= 0",
        ),
        ([{"kind": "stdlib", "weight": 0}, {"kind": "files", "paths": ["x"], "weight": 0.0}], {}, "every weight is 0"),
        ([{"kind": "stdlib", "weight": float("nan")}], {}, "weight=nan is not allowed"),
        ([{"kind": "stdlib", "weight": "lots"}], {}, "weight='lots' is not allowed"),
        ([{"kind": "stdlib"}], {}, r"data.sources\[0\] \(stdlib\) has no weight"),
        ([{"weight": 1}], {}, r"data.sources\[0\] has no kind; give kind: stdlib, files, hf"),
        ([{"kind": "web", "weight": 1}], {}, r"data.sources\[0\].kind='web' is not allowed; choose one of"),
        ([{"kind": "files", "pathz": ["x"], "weight": 1}], {}, "unknown key 'pathz'; did you mean paths?"),
        ([{"kind": "files", "weight": 1}], {}, r"data.sources\[0\] \(files\) needs paths"),
        ([{"kind": "hf", "weight": 1}], {}, r"data.sources\[0\] \(hf\) needs name"),
        ([{"kind": "stdlib", "paths": ["x"], "weight": 1}], {}, "paths is not a key of a stdlib source"),
        ([{"kind": "stdlib", "weight": 1, "max_files": 0}], {}, "max_files=0 is not allowed"),
        ([{"kind": "stdlib", "weight": 1, "label": "a b"}], {}, "label='a b' is not allowed"),
        (
            [{"kind": "stdlib", "weight": 1, "label": "x"}, {"kind": "stdlib", "weight": 1, "label": "x"}],
            {},
            "two sources are labelled 'x'",
        ),
        (["stdlib"], {}, r"data.sources\[0\]='stdlib': a source is a mapping"),
        ([{"kind": "stdlib", "weight": 1}], {"paths": ["x"]}, "data.paths is not read by data=mix"),
    ],
)
def test_bad_sources_are_one_clear_line(sources, top, message):
    with pytest.raises(ConfigError, match=message) as err:
        mix(*sources, **top)
    assert "\n" not in str(err.value)


def test_sources_without_data_mix_are_refused():
    with pytest.raises(ConfigError, match=r"data.sources is for data=mix \(data.source='stdlib'\)"):
        DataConfig(sources=[{"kind": "stdlib", "weight": 1}])


def test_sources_from_the_command_line_and_a_yaml_file(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from pretrain.__main__ import CONF_DIR
    from pretrain.config import register_configs

    register_configs()
    override = (
        "data.sources=[{kind: stdlib, weight: 0.3, max_files: 4}, {kind: files, paths: [long/*.txt], weight: 0.7}]"
    )
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=["data=mix", override]))
    assert [(s.label, s.weight, s.paths) for s in cfg.data.sources] == [
        ("stdlib", 0.3, []),
        ("files", 0.7, ["long/*.txt"]),
    ]


# ---------------------------------------------------------------- preparing


def test_a_prepared_mixture_has_a_shared_tokenizer_and_shards_per_source(tmp_path):
    sources = [
        {"kind": "stdlib", "weight": 3, "max_files": 6, "label": "head"},
        {"kind": "files", "paths": [str(tmp_path / "docs" / "*.txt")], "weight": 1},
    ]
    (tmp_path / "docs").mkdir()
    for i in range(6):
        (tmp_path / "docs" / f"{i}.txt").write_text(f"document {i}\n" + "long context text " * (50 + 10 * i))
    data = data_config(tmp_path, source="mix", max_files=None, sources=sources, vocab_size=400, val_fraction=0.3)
    corpus = prepare_corpus(data, verbose=False)
    assert corpus.directory.name.startswith("mix-") and corpus.train is None
    assert [(s.label, s.weight) for s in corpus.sources] == [("head", 3.0), ("files", 1.0)]
    meta = corpus.metadata
    assert [s["share"] for s in meta["sources"]] == [0.75, 0.25]
    assert meta["tokenizer"]["sample_chars"] <= data.tokenizer_sample_chars
    # The whole validation split is the sources' validation shards back to back; documents end in EOS.
    own = [s.val[:] for s in corpus.sources]
    assert np.array_equal(corpus.tokens("val")[:], np.concatenate(own))
    docs = list(corpus.val_documents())
    assert sum(s["splits"]["val"]["documents"] for s in meta["sources"]) == len(docs)
    assert all(doc[-1] == corpus.metadata["special_ids"]["eos"] for doc in docs)
    assert prepare_corpus(data, verbose=False).directory == corpus.directory  # unchanged inputs: a cache hit
    reweighted = data_config(
        tmp_path,
        source="mix",
        max_files=None,
        vocab_size=400,
        val_fraction=0.3,
        sources=[{**sources[0], "weight": 1}, sources[1]],
    )
    from pretrain.data.prepare import fingerprint_inputs

    assert fingerprint_inputs(reweighted)[0] != fingerprint_inputs(data)[0]
