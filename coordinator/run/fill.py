"""The asynchronous loop's last step, filled: work for the nodes that would sit idle.

The last outer step waits for every train lease still out, so the nodes done first would
wait for the slowest with nothing to do. ``fill_sizes`` gives each of them one more train
lease, sized by its measured speed to end when the work out is predicted to (``MARGIN`` of
the time it has, at least ``MIN_SHARE`` of its regular lease), and its update joins the
step: the run ends no later and the wait becomes tokens.

A node's end is predicted from when it began the work it holds (its last reply, or the send
to it while it held nothing) plus that work at its measured speed (tokens/s of its recent
accepted train updates). The errors lean one way, so a fill never makes the step wait: the
*horizon* (the latest end among the nodes holding work) leaves their evaluations out, and a
node's *own* end counts its evaluations at the training rate (a forward pass costs less), so
a fill is if anything short. A node with no measured speed is not filled and does not set
the horizon. The deadline is that of a sized lease (``deadline_factor`` x the expected time
+ ``deadline_slack_s``), whatever ``target_lease_s`` says: a fill that stalls holds the last
step up to that long.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from protocol.messages import Kind, Lease

from coordinator.run.sizing import Size, SizingLike, size_lease

__all__ = ["NodeWork", "fill_sizes", "predicted_end"]

# A fill is at least this share of the node's regular lease: the norm rule rejects an update
# whose L2 norm is below the step's median over ``norm_factor`` (3), and a 23-step fill among
# 240-step leases (norm 4.3 against 12-15) was: wasted work, and a rejection on an honest
# node's record. 137 and 178 steps were accepted (norm 12.4 and 11.8).
MIN_SHARE = 0.25
# A fill takes this share of the time it has: a node's speed is the mean of its recent leases,
# and on the 2-core bench a node ran 10-15% faster or slower than that as the others went idle
# or came back (a fill sized to the whole gap ended 2.5 s after the lease it was to end with)
MARGIN = 0.85

# (when it began the work it holds, that work in order, its tokens/s or None)
NodeWork = tuple[float, Sequence[Lease], float | None]


def predicted_end(work: NodeWork, now: float, with_evals: bool) -> float:
    """When a node of measured speed should be done with what it holds (never before
    ``now``); evaluations counted at the training rate or not at all."""
    began, held, speed = work
    assert speed is not None and speed > 0
    seconds = 0.0
    for lease in held:
        if lease.kind == Kind.TRAIN:
            seconds += lease.inner_steps * lease.batch_size * lease.seq_len / speed
        elif with_evals:
            seconds += (lease.data_end - lease.data_start) / speed
    return max(now, began + seconds)


def fill_sizes(t: SizingLike, now: float, busy: Mapping[int, NodeWork],
               free: Mapping[int, NodeWork]) -> dict[int, Size]:
    """The fill lease of each ``free`` node (one with a train slot free) whose share of the
    time before the latest predicted end among the ``busy`` nodes (those holding work) is
    worth at least ``min_inner_steps`` and ``MIN_SHARE`` of its regular lease."""
    ends = [predicted_end(w, now, with_evals=False) for w in busy.values()
            if w[2] is not None and w[2] > 0]
    horizon = max(ends, default=now)
    per_step = t.batch_size * t.seq_len
    out = {}
    for node, work in free.items():
        speed = work[2]
        if speed is None or speed <= 0:
            continue
        gap = horizon - predicted_end(work, now, with_evals=True)
        steps = min(t.max_inner_steps, int(MARGIN * gap * speed / per_step))
        least = max(t.min_inner_steps, math.ceil(MIN_SHARE * size_lease(t, speed).inner_steps))
        if steps >= least:
            out[node] = Size(steps, t.deadline_factor * steps * per_step / speed
                             + t.deadline_slack_s)
    return out
