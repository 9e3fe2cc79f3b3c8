"""The model is built at the vocabulary of the corpus the run trains on: a BPE corpus of V
tokens gives version 0 an embedding of V rows, through the launcher and ``ModelStore.open``
as the ServerApp calls them; a checkpoint or a model that cannot match is one ConfigError line.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import coordinator.services.launcher as launcher
from coordinator.rundir import RunDir, init_run, prepare_corpus
from coordinator.run.model_store import ModelStore, model_config, run_vocab_size
from protocol.errors import ConfigError
from training.checkpoint import load_checkpoint
from training.corpus import CorpusInfo, build_folder_corpus, load_corpus

VOCAB = 400  # [data].vocab_size asked; the trained tokenizer may hold fewer
EMBEDDING = "model.embed_tokens.weight"  # llama's


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    words = ("the model reads a token and the next token follows from the tokens before "
             "it while the loss falls").split()
    rng = random.Random(3)
    src = tmp_path_factory.mktemp("text")
    for i in range(24):
        (src / f"d{i:02d}.txt").write_text(" ".join(rng.choice(words) for _ in range(300)))
    return src


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory: pytest.TempPathFactory, text: Path) -> tuple[RunDir, CorpusInfo]:
    rd = init_run(tmp_path_factory.mktemp("run") / "run", model_family="llama",
                  data_source=str(text), data_licence="CC0-1.0", data_tokenizer="bpe",
                  data_vocab_size=VOCAB, data_val_every=4, network_metrics_address="")
    prepare_corpus(rd)
    return rd, load_corpus(rd.corpus)  # what the ServerApp reads


def test_a_bpe_corpus_sizes_the_models_embedding(bpe_run: tuple[RunDir, CorpusInfo]) -> None:
    rd, corpus = bpe_run
    v = corpus.vocab_size
    assert corpus.tokenizer_kind == "bpe" and 256 < v <= VOCAB and run_vocab_size(corpus) == v
    cfg = rd.config()
    with rd.ledger(cfg) as ledger:
        store = ModelStore.open(rd.checkpoints, cfg, ledger, corpus=corpus)
        assert store.spec.vocab_size == v and store.arrays[EMBEDDING].shape[0] == v
        _, meta = load_checkpoint(ledger.latest_version().path)
        assert meta["model"]["vocab_size"] == v  # what every work message's arch says
        again = ModelStore.open(rd.checkpoints, cfg, ledger, corpus=corpus)  # a resume
        assert again.digest == store.digest and again.arrays[EMBEDDING].shape[0] == v


def test_a_checkpoint_of_another_vocabulary_is_one_line(
        bpe_run: tuple[RunDir, CorpusInfo], text: Path, tmp_path: Path) -> None:
    rd, corpus = bpe_run
    cfg = rd.config()
    byte = build_folder_corpus(text, tmp_path / "bytes", val_every=4, licence="CC0-1.0")
    with rd.ledger(cfg) as ledger:
        ModelStore.open(rd.checkpoints, cfg, ledger, corpus=corpus)  # version 0 at V
        for other in (byte, None):  # the corpus rebuilt with bytes; a caller naming none
            with pytest.raises(ConfigError) as info:
                ModelStore.open(rd.checkpoints, cfg, ledger, corpus=other)
            msg = str(info.value)
            assert f"vocabulary of {corpus.vocab_size} tokens, the run's corpus 256" in msg
            assert "\n" not in msg


def test_the_launcher_sizes_the_model_from_the_corpus_it_prepares(
        bpe_run: tuple[RunDir, CorpusInfo], monkeypatch: pytest.MonkeyPatch) -> None:
    rd, corpus = bpe_run
    seen: list[int] = []
    real = launcher.model_params
    monkeypatch.setattr(launcher, "model_params",
                        lambda cfg, vocab: seen.append(vocab) or real(cfg, vocab))

    class Stop(Exception):
        pass

    class NoSuperLink:  # the test ends where processes would start
        def __init__(self, *a: object, **kw: object) -> None:
            pass

        def start(self) -> None:
            raise Stop

        def stop(self) -> None:
            pass

    monkeypatch.setattr(launcher, "SuperLink", NoSuperLink)
    with pytest.raises(Stop):
        with launcher.Coordinator(rd):
            pass
    assert seen == [corpus.vocab_size]


def test_a_vocabulary_the_model_cannot_hold_is_one_line(
        bpe_run: tuple[RunDir, CorpusInfo]) -> None:
    cfg = bpe_run[0].config()
    with pytest.raises(ConfigError) as info:
        model_config(cfg, 1 << 25)
    assert str(info.value).startswith("run.toml: [data].tokenizer has 33554432 tokens, more "
                                      "than a family llama model holds")
    assert "\n" not in str(info.value)
