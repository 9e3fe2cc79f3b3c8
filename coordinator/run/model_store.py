"""The current model version, its outer-optimizer state, and how a new version is made.

Versions are content-addressed checkpoints (``training.checkpoint``); the ledger records each
one. The outer Nesterov momentum lives beside them so a restarted coordinator resumes exactly.

With ``[compression] broadcast = "int8"`` a new version is the previous one plus the int8
encoding of the outer step's change (``protocol.compression.apply_delta``), so a node that
holds the previous version rebuilds this one bit for bit from a quarter of the bytes
(``ModelStore.delta``); what the rounding drops is at most half a block's scale per value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors.numpy import load_file, save_file

from protocol.compression import apply_delta, encode_delta
from protocol.errors import CheckpointError
from training.checkpoint import load_checkpoint, save_checkpoint
from training.families import BYTE_VOCAB, ArchError, ModelSpec, arch_of, param_count, run_spec
from training.state import init_arrays

from coordinator.config import RunConfig
from coordinator.ledger import Ledger
from coordinator.run.outer import NesterovOuter

if TYPE_CHECKING:
    from training.corpus import CorpusInfo

__all__ = ["Delta", "ModelStore", "model_config", "model_params", "run_vocab_size"]

Arrays = dict[str, np.ndarray]


def run_vocab_size(corpus: CorpusInfo | None) -> int:
    """The run's vocabulary size: the one number every model of the run is built with, that
    of the corpus the run trains on (its tokenizer's, ``CorpusInfo.vocab_size``: a BPE
    tokenizer may hold fewer tokens than ``[data].vocab_size`` asked for). ``None``: a
    byte-level corpus (256), for tests and benchmarks that build one."""
    return BYTE_VOCAB if corpus is None else corpus.vocab_size


def model_config(cfg: RunConfig, vocab_size: int = BYTE_VOCAB) -> ModelSpec:
    """The run's model (``training.families``): ``[model]`` family and preset, with its
    overrides, at ``vocab_size`` (``run_vocab_size(corpus)``; the default, the byte
    vocabulary, checks ``[model]`` before the corpus exists). The work messages' arch, the
    checkpoints' meta and every model the coordinator builds come from this.

    Raises
    ------
    ConfigError
        One line naming the bad ``[model]`` key, or the tokenizer whose vocabulary the
        model cannot hold.
    """
    from protocol.errors import ConfigError

    m = cfg.model
    try:
        return run_spec(m.family, m.preset, dict(m.overrides or ()), vocab_size, m.gpt_dims())
    except ArchError as err:
        if err.key == "vocab_size":
            raise ConfigError(f"run.toml: [data].tokenizer has {vocab_size} tokens, more than "
                              f"a family {m.family} model holds (vocab_size {err.what})"
                              ) from None
        raise ConfigError(f"run.toml: [model].{err.key} {err.what}") from None


def model_params(cfg: RunConfig, vocab_size: int = BYTE_VOCAB) -> int:
    """Parameters of the run's model at ``vocab_size`` (what bounds an update's size)."""
    return param_count(model_config(cfg, vocab_size))


def _check_vocab(arrays: Arrays, meta: dict[str, object], vocab: int, path: str) -> None:
    """A checkpoint's embedding must have the corpus's ``vocab`` rows: one built before the
    corpus was rebuilt with another tokenizer cannot resume (its token ids mean other text)."""
    from protocol.errors import ConfigError

    model = meta.get("model")
    rows = model.get("vocab_size") if isinstance(model, dict) else None
    if rows is None:  # no meta to say: the token embedding's rows (its name in each family)
        rows = next((a.shape[0] for k, a in arrays.items()
                     if a.ndim == 2 and k.endswith(("wte.weight", "embed_tokens.weight"))),
                    vocab)
    if rows != vocab:
        raise ConfigError(f"checkpoint {path} has a vocabulary of {rows} tokens, the run's "
                          f"corpus {vocab}: the corpus was rebuilt with another tokenizer "
                          "(rebuild it as it was, or start the run over)")


@dataclass(frozen=True)
class Delta:
    """The current version as a change to the previous one: ``base`` (its digest) plus
    ``encoding`` (int8, ``block`` values per scale)."""

    base: str
    encoding: Arrays
    block: int


@dataclass
class ModelStore:
    dir: Path
    spec: ModelSpec  # model_config(cfg, run_vocab_size(corpus))
    outer: NesterovOuter
    version: int = 0
    digest: str = ""
    arrays: Arrays = field(default_factory=dict)
    broadcast: str = "none"  # [compression] broadcast
    block: int = 256
    delta: Delta | None = None  # how the current version travels to holders of the last
    # the asynchronous loop checks work against the version it was built on: the last
    # ``keep`` versions stay in memory (the current one included), by version number
    keep: int = 1
    recent: dict[int, Arrays] = field(default_factory=dict)
    # version 0 is ``init_arrays(spec, init_seed)``: a node can build it instead of fetching
    # it (``protocol.messages.Work.init_seed``; it checks the digest)
    init_seed: int | None = None

    def outer_path(self, version: int) -> Path:
        """The outer optimizer's state right after ``version`` was made. One file per version
        (the last two kept): a coordinator killed after writing v + 1's state but before the
        ledger recorded v + 1 resumes from v with v's state, not with a step applied twice."""
        return self.dir / f"outer-state-{version}.safetensors"

    @classmethod
    def open(cls, dir: Path, cfg: RunConfig, ledger: Ledger, seed: int = 0, *,
             corpus: CorpusInfo | None = None) -> ModelStore:
        """Resume from the ledger's latest version, or create and record version 0, with the
        vocabulary of ``corpus``, the one the run trains on (None: a byte-level corpus).

        Raises
        ------
        ConfigError
            If the model cannot hold the corpus's vocabulary, or the latest checkpoint was
            built for another vocabulary (the corpus was rebuilt with another tokenizer).
        CheckpointError
            If the checkpoint or the outer optimizer's state is not what the ledger says.
        """
        a = cfg.asynchronous
        store = cls(dir, model_config(cfg, run_vocab_size(corpus)),
                    NesterovOuter(cfg.outer.lr, cfg.outer.momentum, cfg.outer.nesterov),
                    broadcast=cfg.compression.broadcast, block=cfg.compression.block,
                    keep=a.max_staleness + 1 if a.enabled else 1)
        store.init_seed = seed  # (resumed too: version 0 was made here, the same way)
        latest = ledger.latest_version()
        if latest is None:
            store.arrays = init_arrays(store.spec, seed)
            path, store.digest = save_checkpoint(
                dir, store.arrays, {"version": 0, "model": arch_of(store.spec), "round": 0})
            ledger.add_model_version(0, store.digest, str(path), 0, n_updates=0, tokens=0)
            ledger.add_event("version", "version 0 initialised")
            store.recent = {0: store.arrays}
            return store
        store.arrays, meta = load_checkpoint(latest.path)
        if meta.get("digest") != latest.digest:
            raise CheckpointError(f"checkpoint {latest.path} is not version {latest.version} "
                                  "recorded in the ledger")
        _check_vocab(store.arrays, meta, store.spec.vocab_size, latest.path)
        store.version, store.digest = latest.version, latest.digest
        store.recent = {latest.version: store.arrays}
        for older in ledger.versions()[-store.keep:-1]:
            store.recent[older.version], _ = load_checkpoint(older.path)
        path = store.outer_path(latest.version)
        if path.exists():
            try:
                store.outer.load_state_dict(load_file(str(path)))
            except Exception as err:  # noqa: BLE001 - a corrupt file of ours, one line
                raise CheckpointError(f"outer optimizer state {path} is corrupt: "
                                      f"{str(err).splitlines()[0]}") from None
        elif latest.version > 0 and cfg.outer.momentum > 0:
            raise CheckpointError(f"outer optimizer state {path} is missing: version "
                                  f"{latest.version} cannot resume with its momentum")
        return store

    def base(self, version: int) -> Arrays | None:
        """The arrays of ``version`` if it is one of the last ``keep`` (else None)."""
        return self.recent.get(version)

    def shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {k: (tuple(a.shape), a.dtype.str) for k, a in self.arrays.items()}

    def advance(self, delta: Arrays, ledger: Ledger, *, round: int, n_updates: int,
                tokens: int, at: float | None = None) -> int:
        """Apply the aggregated pseudo-gradient with the outer optimizer; record the version."""
        new = self.outer.step(self.arrays, delta)
        change = None
        if self.broadcast == "int8":
            change = Delta(self.digest, encode_delta(self.arrays, new, self.block), self.block)
            new = apply_delta(self.arrays, change.encoding, self.block)
        version = self.version + 1
        path, digest = save_checkpoint(self.dir, new, {"version": version,
                                                       "model": arch_of(self.spec),
                                                       "round": round})
        save_file(self.outer.state_dict(), str(self.outer_path(version)))
        self.outer_path(version - 2).unlink(missing_ok=True)
        ledger.add_model_version(version, digest, str(path), round, n_updates=n_updates,
                                 tokens=tokens, created_at=at)
        self.arrays, self.version, self.digest, self.delta = new, version, digest, change
        self.recent[version] = new
        for old in [v for v in self.recent if v <= version - self.keep]:
            del self.recent[old]
        return version
