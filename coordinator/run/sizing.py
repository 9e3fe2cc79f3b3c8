"""Work sized to each node (BOINC / Folding@home style): a train lease asks for as many inner
steps as the node does in about ``[train] target_lease_s``, from what it measured itself.

A node's speed is the tokens over the wall seconds of its last few accepted train updates
(``wall_s`` is the node's own report; a node that lies about it only sizes its own leases: too
fast and it misses its deadlines and is benched, too slow and it earns less per lease —
credit follows verified tokens either way). A node with no history gets ``inner_steps``
(its calibration lease) and ``deadline_s``. With history::

    steps    = clamp(round(target_lease_s * tokens_per_s / (batch_size * seq_len)),
                     min_inner_steps, max_inner_steps)
    deadline = deadline_factor * steps * batch_size * seq_len / tokens_per_s + deadline_slack_s

The slack covers fetching the base and the shard, the upload and Flower's delivery; the
factor a node slowed by other work. An evaluation lease's deadline comes from the same speed
(``deadline_factor * tokens / tokens_per_s + deadline_slack_s``). ``target_lease_s = 0`` turns sizing off: every lease is
``inner_steps`` with ``deadline_s``, as before.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["HISTORY", "Size", "SizingLike", "deadline_for", "eval_deadline_for", "size_lease",
           "tokens_per_s"]

HISTORY = 5  # accepted train updates a speed is measured over (the most recent)


class SizingLike(Protocol):
    """What sizing reads from ``config.TrainParams``."""

    inner_steps: int
    batch_size: int
    seq_len: int
    deadline_s: float
    target_lease_s: float
    min_inner_steps: int
    max_inner_steps: int
    deadline_factor: float
    deadline_slack_s: float


@dataclass(frozen=True)
class Size:
    inner_steps: int
    deadline_s: float  # seconds from the lease's start


def tokens_per_s(history: Iterable[tuple[int, float | None]]) -> float | None:
    """A node's speed from ``(tokens, wall_s)`` of its accepted train updates, newest first
    (the first ``HISTORY`` count); None without a usable one."""
    tokens = seconds = 0.0
    for n, (tok, wall) in enumerate(history):
        if n == HISTORY:
            break
        if wall is not None and wall > 0 and tok > 0:
            tokens, seconds = tokens + tok, seconds + wall
    return tokens / seconds if seconds > 0 else None


def size_lease(t: SizingLike, speed: float | None) -> Size:
    """The inner steps and deadline of a train lease for a node of ``speed`` tokens/s."""
    if t.target_lease_s <= 0 or speed is None or speed <= 0:
        return Size(t.inner_steps, t.deadline_s)
    steps = min(t.max_inner_steps, max(t.min_inner_steps, round(
        t.target_lease_s * speed / (t.batch_size * t.seq_len))))
    return Size(steps, deadline_for(t, steps, speed))


def deadline_for(t: SizingLike, steps: int, speed: float | None) -> float:
    """Seconds a node of ``speed`` tokens/s gets for ``steps`` inner steps (a spot check's
    copy keeps the original's steps); unknown speed: ``deadline_s`` per ``inner_steps``."""
    if t.target_lease_s <= 0:
        return t.deadline_s
    if speed is None or speed <= 0:
        return t.deadline_s * max(1.0, steps / t.inner_steps)
    return t.deadline_factor * steps * t.batch_size * t.seq_len / speed + t.deadline_slack_s


def eval_deadline_for(t: SizingLike, tokens: int, speed: float | None) -> float:
    """Seconds a node of ``speed`` trained tokens/s gets to evaluate ``tokens`` (a forward
    pass costs less than a training step per token, so the training rate bounds it);
    ``deadline_s`` without sizing or a measured speed."""
    if t.target_lease_s <= 0 or speed is None or speed <= 0:
        return t.deadline_s
    return t.deadline_factor * tokens / speed + t.deadline_slack_s
