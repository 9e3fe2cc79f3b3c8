"""The views' records: frozen dataclasses of plain values, and their way back from JSON.

``dataclasses.asdict(view)`` is JSON-serialisable; ``View.from_dict(doc)`` rebuilds the view
from what ``json.loads`` gives back (the status RPC sends views as JSON), checking every
field's type and raising ``ProtocolError`` on anything else. Keys a view does not know are
ignored, so an older TUI reads a newer coordinator's views.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union

from protocol.errors import ProtocolError

__all__ = [
    "CreditRow", "EventRow", "EventsView", "HistoryPoint", "LossPoint", "NetworkHeader",
    "NetworkView", "NodeDetail", "NodeRow", "ProgressView", "RunInfo", "ThroughputPoint",
    "UpdateLine",
]

T = TypeVar("T", bound="_FromDict")


def _fail(where: str, want: str, value: Any) -> ProtocolError:
    return ProtocolError(f"{where} must be {want}, got {type(value).__name__}")


def _decode(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if isinstance(tp, type) and issubclass(tp, _FromDict):
        return tp._from_dict(value, where)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _decode(inner, value, where)
    if origin is tuple:
        if not isinstance(value, list):
            raise _fail(where, "a list", value)
        return tuple(_decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise _fail(where, "an object", value)
        return {k: _decode(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str) and isinstance(value, tp) and not isinstance(value, bool):
        return value
    raise _fail(where, getattr(tp, "__name__", str(tp)), value)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


class _FromDict:
    """``from_dict`` for the frozen dataclasses below."""

    @classmethod
    def from_dict(cls: type[T], doc: Any) -> T:
        """The view ``dataclasses.asdict`` turned into ``doc`` (ProtocolError otherwise)."""
        return cls._from_dict(doc, cls.__name__)

    @classmethod
    def _from_dict(cls: type[T], doc: Any, where: str) -> T:
        if not isinstance(doc, dict):
            raise _fail(where, "an object", doc)
        hints, values = _hints(cls), {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name in doc:
                values[f.name] = _decode(hints[f.name], doc[f.name], f"{where}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"{where} has no {f.name}")
        return cls(**values)


@dataclass(frozen=True)
class RunInfo(_FromDict):
    run_id: str
    round: int
    version: int | None
    val_loss: float | None


@dataclass(frozen=True)
class NetworkHeader(_FromDict):
    run: RunInfo
    online: int
    nodes: int
    tokens_per_s: float
    window_s: float


@dataclass(frozen=True)
class NodeRow(_FromDict):
    node_id: int
    name: str
    institution: str
    status: str  # working | idle | offline | revoked
    current_shard: str  # "train 12" while working, else ""
    accepted: int
    rejected: int
    tokens: int  # accepted train tokens
    eval_tokens: int
    credits: float
    acceptance_rate: float | None  # None before the first update
    last_seen: float | None


@dataclass(frozen=True)
class NetworkView(_FromDict):
    at: float
    header: NetworkHeader
    nodes: tuple[NodeRow, ...]


@dataclass(frozen=True)
class LossPoint(_FromDict):
    version: int
    round: int
    val_loss: float | None
    tokens: int
    created_at: float


@dataclass(frozen=True)
class ThroughputPoint(_FromDict):
    start: float  # bucket start, unix seconds
    tokens: int
    tokens_per_s: float


@dataclass(frozen=True)
class ProgressView(_FromDict):
    losses: tuple[LossPoint, ...]
    throughput: tuple[ThroughputPoint, ...]
    bucket_s: float


@dataclass(frozen=True)
class HistoryPoint(_FromDict):
    at: float
    tokens: int  # cumulative accepted train tokens
    credits: float  # cumulative credits


@dataclass(frozen=True)
class UpdateLine(_FromDict):
    update_id: int
    at: float
    round: int
    kind: str
    shard_id: int
    verdict: str
    reason: str | None
    detail: str
    tokens: int
    loss_before: float | None
    loss_after: float | None
    norm: float | None  # L2 norm of an accepted pseudo-gradient


@dataclass(frozen=True)
class CreditRow(_FromDict):
    credit_id: int
    at: float
    update_id: int
    amount: float
    components: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NodeDetail(_FromDict):
    row: NodeRow
    history: tuple[HistoryPoint, ...]
    updates: tuple[UpdateLine, ...]
    credits: tuple[CreditRow, ...]
    credits_by_kind: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EventRow(_FromDict):
    event_id: int
    at: float
    kind: str
    node_id: int | None
    message: str


@dataclass(frozen=True)
class EventsView(_FromDict):
    events: tuple[EventRow, ...]
    last_id: int  # pass back as ``since_id`` to get only newer events
