"""The run loop writes the nodes' ``last_seen``: a node new online at once, every node
online at most every ``TOUCH_S`` (each second cost PostgreSQL a row version per node and
moved the TUI's change mark every second at 1,000 nodes; bench/scale.py)."""

from __future__ import annotations

from test_run_loop import corpus, nets, network  # noqa: F401  (fixtures)

from coordinator.run.roster import TOUCH_S


def seen(net) -> dict[str, float | None]:  # type: ignore[no-untyped-def]
    return {n.name: n.last_seen for n in net.ledger.nodes()}


def test_a_new_node_is_seen_at_once_and_all_of_them_every_touch_interval(network) -> None:
    net = network(["honest", "honest"])
    a, b = (n.name for n in net.ledger.nodes())
    net.nodes[1].online = False
    t0 = net.clock()
    net.loop.roster.eligible()
    assert seen(net) == {a: t0, b: None}

    net.clock.sleep(2.0)
    net.nodes[1].online = True  # new online: written at once, the others left alone
    net.loop.roster.eligible()
    assert seen(net) == {a: t0, b: t0 + 2.0}

    net.clock.sleep(TOUCH_S - 2.0)  # the interval since the last full write: both now
    net.loop.roster.eligible()
    assert seen(net) == {a: t0 + TOUCH_S, b: t0 + TOUCH_S}
