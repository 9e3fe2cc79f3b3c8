"""Content-addressed checkpoints: ``<digest16>.safetensors`` + ``<digest16>.json`` meta.

The digest is ``protocol.digest.digest_arrays`` of the weights, the same digest that
leases carry as ``base_digest``, so a node can check a downloaded base before training
on it. The meta JSON holds at least::

    {"format": 1, "digest": <hex sha256>, "version": <model version>, "model": {arch}}

where ``arch`` is ``training.families.arch_of``: GPTConfig's fields for the built-in GPT,
``{"family": "llama", ...}`` for a transformers family.

plus whatever the caller adds. The digest is also stored in the safetensors header.
Loading recomputes it; any mismatch or damage raises a one-line ``CheckpointError``.
No torch here: the coordinator can read and write checkpoints with numpy alone.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from protocol.digest import digest_arrays
from protocol.errors import CheckpointError

__all__ = ["FORMAT", "save_checkpoint", "load_checkpoint"]

FORMAT = 1


def save_checkpoint(
    dir: str | os.PathLike[str], arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]
) -> tuple[Path, str]:
    """Write ``arrays`` and ``meta`` to ``dir``, named by their digest; return (path, digest).

    ``meta`` must hold ``"version"`` and ``"model"`` (a GPTConfig or an arch dict); ``"format"``
    and ``"digest"`` are filled in here. Writing the same weights twice is harmless.

    Raises
    ------
    ValueError
        If ``meta`` lacks ``version`` or ``model`` or is not JSON-serialisable.
    """
    meta = dict(meta)
    for key in ("version", "model"):
        if key not in meta:
            raise ValueError(f"checkpoint meta needs {key!r}")
    if is_dataclass(meta["model"]) and not isinstance(meta["model"], type):
        meta["model"] = asdict(meta["model"])
    arrays = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
    digest = digest_arrays(arrays)
    meta.update(format=FORMAT, digest=digest)
    try:
        meta_text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint meta is not JSON-serialisable: {e}") from None

    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{digest[:16]}.safetensors"
    blob = st_save(arrays, metadata={"format": str(FORMAT), "digest": digest})
    # Weights first, meta last: a meta file only ever sits beside complete weights.
    _atomic_write(path, blob)
    _atomic_write(path.with_suffix(".json"), meta_text.encode())
    return path, digest


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a checkpoint written by ``save_checkpoint`` and verify its digest.

    ``path`` is the ``.safetensors`` file; its meta is the ``.json`` beside it.

    Raises
    ------
    CheckpointError
        ``checkpoint <path> is corrupt: <why>`` if a file is missing, unreadable or
        malformed, or the weights do not match the digest in the meta.
    """
    path = Path(path)
    meta_path = path.with_suffix(".json")

    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path} is corrupt: {why}")

    try:
        blob = path.read_bytes()
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError as e:
        raise corrupt(f"missing file {e.filename}") from None
    except (OSError, ValueError) as e:
        raise corrupt(f"unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or "digest" not in meta:
        raise corrupt(f"{meta_path.name} is not a checkpoint meta")
    if meta.get("format") != FORMAT:
        raise corrupt(f"unsupported format {meta.get('format')!r}")

    try:
        header_meta = _header_metadata(blob)
        arrays = st_load(blob)
    except Exception as e:  # safetensors raises its own SafetensorError on any damage
        raise corrupt(f"bad safetensors data ({type(e).__name__})") from None
    if header_meta.get("digest") != meta["digest"]:
        raise corrupt("the weights file and its meta name different digests")
    actual = digest_arrays(arrays)
    if actual != meta["digest"]:
        raise corrupt(f"digest mismatch (expected {meta['digest'][:16]}, got {actual[:16]})")
    return arrays, meta


def _header_metadata(blob: bytes) -> dict[str, str]:
    # safetensors layout: u64 LE header length, then a JSON header with "__metadata__".
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("__metadata__ is not an object")
    return meta


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
