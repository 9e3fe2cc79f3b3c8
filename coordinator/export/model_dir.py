"""``atom-coordinator export-model``: one model version as a Hugging Face model folder.

::

    OUT/config.json, model.safetensors     the transformers model (coordinator.export.hf)
    OUT/generation_config.json             greedy, max_new_tokens, eos = end-of-text
    OUT/tokenizer.json, tokenizer_config.json
    OUT/README.md                          the model card (coordinator.export.card)
    OUT/atom_provenance.json               the card's numbers as canonical JSON

The folder is written beside OUT under a temporary name and renamed into place at the end,
so OUT is either the whole export or untouched. Everything is read from the run directory
and its ledger (opened read-only: a running coordinator is not disturbed); nothing is
downloaded.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.errors import AtomError, CheckpointError
from training.checkpoint import load_checkpoint
from training.corpus import load_corpus

from coordinator.ledger import Ledger
from coordinator.ledger.models import ModelVersion
from coordinator.rundir import RunDir

__all__ = ["STAGES", "Exported", "export_model", "read_version"]

# what ``on_stage`` is told, in order
STAGES = ("reading the version", "building the model", "reading the ledger",
          "writing the model", "writing the tokenizer and the card")
PROVENANCE_FILE = "atom_provenance.json"
CARD_FILE = "README.md"
Stage = Callable[[str], None]


@dataclass(frozen=True)
class Exported:
    out: Path
    version: int
    digest: str
    exported_as: str
    val_loss: float | None
    receipts_root: str


def export_model(rd: RunDir, out: Path, *, version: int | None = None, force: bool = False,
                 on_stage: Stage | None = None) -> Exported:
    """Write ``version`` (default: the latest) of ``rd``'s run to ``out``.

    Raises
    ------
    ConfigError
        ``rd`` is not a run directory, or its corpus files are missing or changed.
    CheckpointError
        The version is not in the ledger, its checkpoint is missing or corrupt, or it is not
        the weights the ledger recorded.
    AtomError
        ``out`` exists and is not an empty directory (without ``force``), or cannot be
        written.
    """
    stage = on_stage or (lambda _: None)
    cfg = rd.config()
    out = out.expanduser().absolute()
    _check_out(out, force)
    stage(STAGES[0])
    with Ledger.read_only(cfg.ledger_url(rd.path)) as ledger:
        rows = ledger.versions()
        row, arrays, meta = read_version(rd, rows, version)
        corpus = load_corpus(rd.corpus, verify=False)
        stage(STAGES[1])
        from coordinator.export import hf  # torch and transformers: only past the checks

        model, tokenizer, _ = hf.transformers_model(arrays, meta.get("model"), corpus)
        stage(STAGES[2])
        from coordinator.export.card import model_card, provenance

        prov = provenance(ledger, corpus, run_id=cfg.run.id,
                          rows=[v for v in rows if v.version <= row.version],
                          model=meta["model"], exported_as=type(model).__name__)
    with _staging(out, force) as tmp:
        stage(STAGES[3])
        with _quiet_transformers():
            model.save_pretrained(tmp)
            stage(STAGES[4])
            tokenizer.save_pretrained(tmp)
        model_card(prov).save(tmp / CARD_FILE)
        (tmp / PROVENANCE_FILE).write_bytes(prov.to_json())
        _plain_modes(tmp)
    return Exported(out, row.version, row.digest, prov.exported_as, prov.val_loss,
                    prov.receipts_root)


def read_version(rd: RunDir, rows: list[ModelVersion], version: int | None) -> tuple[
        ModelVersion, dict[str, Any], dict[str, Any]]:
    """``version`` (default: the latest) of the ledger's ``rows``: its row, and its
    checkpoint's arrays and meta, checked to be the weights the ledger recorded.

    Raises
    ------
    CheckpointError
        The version is not in ``rows`` (or there is none), its checkpoint is missing or
        corrupt, or it holds other weights than the ledger recorded.
    """
    row = _version_row(rows, version)
    arrays, meta = load_checkpoint(_checkpoint_path(rd, row))
    if meta.get("digest") != row.digest:
        raise CheckpointError(f"checkpoint of version {row.version} holds weights "
                              f"{str(meta.get('digest'))[:16]}, the ledger recorded "
                              f"{row.digest[:16]}")
    return row, arrays, meta


def _version_row(rows: list[ModelVersion], version: int | None) -> ModelVersion:
    if not rows:
        raise CheckpointError("the ledger has no model version yet: start the run first")
    if version is None:
        return rows[-1]
    for row in rows:
        if row.version == version:
            return row
    raise CheckpointError(f"version {version} is not in the ledger (it has versions "
                          f"{rows[0].version}..{rows[-1].version})")


def _checkpoint_path(rd: RunDir, row: ModelVersion) -> Path:
    """Where the ledger says the checkpoint is, or, for a run directory that has moved, the
    same content-addressed name in its checkpoints/."""
    recorded = Path(row.path)
    return recorded if recorded.exists() else rd.checkpoints / recorded.name


def _check_out(out: Path, force: bool) -> None:
    if out.is_dir() and not force and any(out.iterdir()):
        raise AtomError(f"{out} exists and is not empty (--force replaces it)")
    if out.exists() and not out.is_dir():
        raise AtomError(f"{out} exists and is not a directory")


@contextmanager
def _staging(out: Path, force: bool) -> Iterator[Path]:
    """A fresh folder beside ``out`` to write into; renamed to ``out`` if the block ends
    well, removed if not."""
    tmp = out.with_name(f".{out.name}.export-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        yield tmp
        _check_out(out, force)  # something may have appeared there meanwhile
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as exc:
        raise AtomError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _plain_modes(folder: Path) -> None:
    """Every file as the umask makes a new one: transformers writes the weights 0600, which
    a folder meant for publishing should not keep."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


@contextmanager
def _quiet_transformers() -> Iterator[Any]:
    """transformers' own tqdm bars off while it saves (the CLI draws its own)."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()
