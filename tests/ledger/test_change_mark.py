"""The change mark moves with every write a view shows, so a cache keyed on it is never stale;
and a view says truly until when the clock alone leaves it as it is. Both backends."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pytest

from coordinator.ledger import Ledger
from coordinator.services.view_cache import ViewCache
from coordinator.services.views import (
    ONLINE_WINDOW_S, THROUGHPUT_WINDOW_S, events_view, network_view, network_view_until,
    node_detail, node_detail_until, progress_view, run_info,
)

NOW = 1000.0


def fresh_views(ledger: Ledger, node_ids: list[int]) -> tuple[object, ...]:
    return (network_view(ledger, NOW, "r"), progress_view(ledger), run_info(ledger, "r"),
            events_view(ledger, 0), *(node_detail(ledger, n, NOW) for n in node_ids))


def cached_views(cache: ViewCache, node_ids: list[int]) -> tuple[object, ...]:
    cache.refresh()
    return (cache.network(NOW), cache.progress(NOW), cache.run(NOW), cache.events(0),
            *(cache.node(n, NOW) for n in node_ids))


def test_every_write_moves_the_mark_and_the_cache_follows(ledger: Ledger, make,
                                                          open_ledger) -> None:
    reader = open_ledger(read_only=True)
    cache = ViewCache(reader, "r")
    uni = ledger.add_institution("Uni A", now=1.0)
    ids: list[int] = []
    state: dict[str, int] = {}

    def add_node() -> None:
        ids.append(make.node(uni.id).id)

    def lease() -> None:
        state["lease"] = make.lease(ids[0], issued_at=900.0, deadline=1100.0).id

    def answer(verdict: str = "accepted", reason: str | None = None) -> None:
        lease_row = make.lease(ids[-1], issued_at=900.0, deadline=1100.0)
        state[verdict] = make.answer(lease_row, verdict=verdict, reason=reason, at=950.0).id

    writes: list[tuple[str, Callable[[], None]]] = [
        ("add_node", add_node),
        ("add_node", add_node),
        ("touch_node", lambda: ledger.touch_node(ids[0], 990.0)),
        ("touch_nodes", lambda: ledger.touch_nodes(ids, 995.0)),
        ("record_lease", lease),
        ("close_lease", lambda: ledger.close_lease(state["lease"], "expired", 999.0)),
        ("record_update", answer),
        ("add_credit", lambda: ledger.add_credit(ids[-1], state["accepted"], 1.0,
                                                 {"kind": "train"}, now=951.0)),
        ("record_update rejected", lambda: answer("rejected", "spot_check_mismatch")),
        ("add_penalty", lambda: ledger.add_penalty(ids[-1], state["rejected"], -2.0,
                                                   {"kind": "penalty"}, now=961.0)),
        ("add_model_version", lambda: ledger.add_model_version(
            0, "00" * 32, "v0", 0, n_updates=0, tokens=0, created_at=100.0)),
        ("set_val_loss", lambda: ledger.set_val_loss(0, 4.5, 100)),
        ("add_event", lambda: ledger.add_event("join", "hello", at=970.0)),
        ("revoke_node", lambda: ledger.revoke_node(ids[1])),
    ]
    for name, write in writes:
        before = reader.change_mark()
        cached_views(cache, ids)  # the cache holds the views as they were
        write()
        assert reader.change_mark() != before, name
        assert cached_views(cache, ids) == fresh_views(reader, ids), name
    assert reader.change_mark() == reader.change_mark()


def test_nothing_written_nothing_recomputed(ledger: Ledger, make, open_ledger) -> None:
    uni = ledger.add_institution("Uni A", now=1.0)
    node = make.node(uni.id)
    ledger.touch_node(node.id, 10.0)  # long offline at NOW: nothing turns with the clock
    cache = ViewCache(open_ledger(read_only=True), "r")
    first = cached_views(cache, [node.id])
    again = cached_views(cache, [node.id])
    assert all(a is b for a, b in zip(first[:3] + first[4:], again[:3] + again[4:]))
    assert cache.events(10**9).events == ()


def test_a_view_holds_until_a_status_or_the_window_turns(ledger: Ledger, make) -> None:
    uni = ledger.add_institution("Uni A", now=1.0)
    idle, working, gone = (make.node(uni.id).id for _ in range(3))
    ledger.touch_node(idle, NOW - 20)  # goes offline at NOW - 20 + ONLINE_WINDOW_S
    ledger.touch_node(working, NOW - 50)
    make.lease(working, issued_at=NOW - 60, deadline=NOW + 100)  # working till its deadline
    ledger.touch_node(gone, NOW - 500)
    make.answer(make.lease(gone, issued_at=NOW - 200), at=NOW - 110)  # leaves the window
    view, until = network_view_until(ledger, NOW, "r")
    assert until == NOW - 110 + THROUGHPUT_WINDOW_S  # the first turn: 10 s from now
    _, idle_until = node_detail_until(ledger, idle, NOW)
    assert idle_until == math.nextafter(NOW - 20 + ONLINE_WINDOW_S, math.inf)
    assert node_detail_until(ledger, gone, NOW)[1] == math.inf
    assert node_detail_until(ledger, working, NOW)[1] == math.nextafter(NOW + 10, math.inf)

    def same(a: object, b: object) -> bool:
        return dataclasses.replace(a, at=0.0) == dataclasses.replace(b, at=0.0)  # type: ignore

    assert same(network_view(ledger, math.nextafter(until, -math.inf), "r"), view)
    assert not same(network_view(ledger, until, "r"), view)  # the throughput changed
    later = NOW - 20 + ONLINE_WINDOW_S
    statuses = {r.node_id: r.status for r in network_view(ledger, later, "r").nodes}
    assert statuses[idle] == "idle"
    statuses = {r.node_id: r.status for r in network_view(ledger, idle_until, "r").nodes}
    assert statuses[idle] == "offline"


def test_a_cached_view_expires_with_the_clock(ledger: Ledger, make, open_ledger) -> None:
    uni = ledger.add_institution("Uni A", now=1.0)
    node = make.node(uni.id).id
    ledger.touch_node(node, NOW - 10)
    cache = ViewCache(open_ledger(read_only=True), "r")
    cache.refresh()
    view = cache.network(NOW)
    assert view.nodes[0].status == "idle"
    assert cache.network(NOW + 49) is view and not cache.expire(NOW + 49)
    assert cache.expire(NOW + 51)  # the node went offline: the view must be read again
    assert cache.network(NOW + 51).nodes[0].status == "offline"
    assert cache.network(NOW - 1) is not cache.network(NOW + 51)  # the clock went back


@pytest.mark.parametrize("rows", [0, 1])
def test_an_empty_ledger_has_a_mark(ledger: Ledger, rows: int) -> None:
    if rows:
        ledger.add_model_version(0, "00" * 32, "v0", 0, n_updates=0, tokens=0)
    mark = ledger.change_mark()
    assert mark.versions[0] == rows and mark.events == 0 and mark.nodes == (0, 0.0, 0)
