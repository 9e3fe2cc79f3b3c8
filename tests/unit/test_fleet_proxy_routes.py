"""What the Fleet proxy lets through to the SuperLink: the Fleet API and /health, nothing else."""

from __future__ import annotations

import pytest

from coordinator.services.fleet_proxy import route


@pytest.mark.parametrize("method, path", [
    ("POST", "/v1/fleet/pull-messages"), ("POST", "/v1/fleet/push-object"),
    ("POST", "/v1/fleet/send-node-heartbeat"), ("POST", "/v1/fleet/activate-node"),
    ("GET", "/health"),
])
def test_fleet_calls_and_health_pass(method: str, path: str) -> None:
    assert route(method, path) is None


@pytest.mark.parametrize("method, path", [
    ("POST", "/v1/control/list-nodes"), ("POST", "/v1/control/register-node"),
    ("POST", "/v1/control/unregister-node"), ("POST", "/v1/control/start-run"),
    ("GET", "/v1/control/stream-logs"), ("POST", "/v1/runtime/pull-task-input"),
    ("POST", "/v1/fleet/../control/list-nodes"), ("POST", "/v1/fleet//control/list-nodes"),
    ("POST", "/v1/control"),
])
def test_control_and_runtime_are_forbidden(method: str, path: str) -> None:
    assert route(method, path) == 403


@pytest.mark.parametrize("method, path", [
    ("GET", "/"), ("GET", "/docs"), ("GET", "/openapi.json"), ("POST", "/v1/fleet/"),
    ("POST", "/v1/fleet/Pull-Messages"), ("POST", "/v1/fleet/pull-messages/"),
    ("POST", "/v1/fleet/pull-messages%2f..%2fcontrol"), ("POST", "/v1/fleetpull"),
    ("POST", "/health/x"), ("POST", "/v1/fleet/pull messages"),
])
def test_everything_else_is_not_found(method: str, path: str) -> None:
    assert route(method, path) == 404


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/fleet/pull-messages"), ("PUT", "/v1/fleet/push-object"),
    ("POST", "/health"), ("DELETE", "/health"),
])
def test_wrong_method_is_not_allowed(method: str, path: str) -> None:
    assert route(method, path) == 405
