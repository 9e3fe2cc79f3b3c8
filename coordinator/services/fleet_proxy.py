"""The Fleet proxy: the one Flower port that faces contributors.

Flower serves its Fleet, Control and Runtime APIs on one port, and the Control API has no
authentication: whoever reaches it can register keys, start runs and unregister nodes. So the
SuperLink listens on loopback only, and this proxy owns the public ``[network] host:fleet_port``.
It terminates TLS with the coordinator's server certificate and forwards, re-encrypted, only

    POST /v1/fleet/<call>     what a SuperNode sends (its node-auth headers pass untouched)
    GET  /health

to the SuperLink; ``/v1/control/*`` and ``/v1/runtime/*`` get 403, anything else 404. Bodies
stream through in both directions (Flower moves 5 MiB objects per request), and a request body
above ``max_body`` bytes is cut off with 413.

Runs as its own process (``python -m coordinator.services.fleet_proxy ...``, started by
:class:`FleetProxy`), so node traffic never competes with the run loop for the GIL.
"""

from __future__ import annotations

import argparse
import re
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.errors import NetworkError
from protocol.processes import flower_env, spawn, stop, wait_port

__all__ = ["FleetProxy", "MAX_BODY", "make_app", "route"]

MAX_BODY = 64 << 20  # Flower's objects are 5 MiB; nothing a SuperNode sends comes near this
_FLEET_CALL = re.compile(r"/v1/fleet/[a-z][a-z0-9-]{0,63}")
# Hop-by-hop headers (RFC 9110 7.6.1) and Host: never forwarded, in either direction.
_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                  b"te", b"trailer", b"upgrade", b"proxy-authorization",
                  b"proxy-authenticate", b"host"})

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def route(method: str, path: str) -> int | None:
    """``None`` when ``method path`` may pass to the SuperLink, else the status to answer.

    The path must match exactly (no ``..``, no ``//``, no encoded tricks: uvicorn hands over
    the decoded path, which is what is checked and what is forwarded).
    """
    allowed = ((method == "POST" and _FLEET_CALL.fullmatch(path) is not None)
               or (method == "GET" and path == "/health"))
    if allowed:
        return None
    if path.startswith(("/v1/control", "/v1/runtime")) or "/control/" in path:
        return 403
    if _FLEET_CALL.fullmatch(path) or path == "/health":
        return 405
    return 404


class _TooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


async def _answer(send: Send, status: int, text: str) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def make_app(upstream: str, ca_file: Path | None, *, max_body: int = MAX_BODY
             ) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The proxy as an ASGI app forwarding to ``https://<upstream>`` (``http://`` when
    ``ca_file`` is None: tests only)."""
    import httpx

    state: dict[str, httpx.AsyncClient] = {}

    def client() -> httpx.AsyncClient:
        if "client" not in state:
            verify: ssl.SSLContext | bool = False
            if ca_file is not None:
                verify = ssl.create_default_context(cafile=str(ca_file))
            state["client"] = httpx.AsyncClient(
                base_url=f"{'https' if ca_file else 'http'}://{upstream}", verify=verify,
                timeout=httpx.Timeout(120.0, connect=10.0), trust_env=False,
                limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
        return state["client"]

    async def lifespan(receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                if "client" in state:
                    await state.pop("client").aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # websockets: refused by not accepting
        method, path = scope["method"], scope["path"]
        if (status := route(method, path)) is not None:
            await _answer(send, status, "forbidden\n" if status == 403 else "not found\n")
            return
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP]
        length = next((v for k, v in headers if k.lower() == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > max_body):
            await _answer(send, 413, "request body too large\n")
            return

        async def body() -> AsyncIterator[bytes]:
            seen = 0
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    raise _ClientGone
                chunk = msg.get("body", b"")
                seen += len(chunk)
                if seen > max_body:
                    raise _TooLarge(f"body above {max_body} bytes")
                if chunk:
                    yield chunk
                if not msg.get("more_body", False):
                    return

        request = client().build_request(method, path, headers=headers,
                                         content=body() if method == "POST" else None)
        try:
            response = await client().send(request, stream=True)
        except _TooLarge:
            await _answer(send, 413, "request body too large\n")
            return
        except _ClientGone:
            return
        except httpx.HTTPError as err:
            await _answer(send, 502, f"SuperLink unreachable ({type(err).__name__})\n")
            return
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [(k, v) for k, v in response.headers.raw
                                    if k.lower() not in _HOP]})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()

    return app


def _connect_host(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)


@dataclass
class FleetProxy:
    """The proxy process on ``host:port`` in front of the SuperLink on 127.0.0.1:upstream_port."""

    workdir: Path
    certfile: Path  # server chain (leaf + CA)
    keyfile: Path
    cafile: Path  # verifies the SuperLink's certificate on loopback
    host: str
    port: int
    upstream_port: int
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        cmd = [sys.executable, "-m", "coordinator.services.fleet_proxy",
               "--listen", f"{self.host}:{self.port}",
               "--upstream", f"127.0.0.1:{self.upstream_port}",
               "--certfile", str(self.certfile), "--keyfile", str(self.keyfile),
               "--cafile", str(self.cafile)]
        log = self.workdir / "logs" / "fleet-proxy.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self.proc = spawn(cmd, env=flower_env(self.workdir / "flwr-home"), log=log,
                          cwd=self.workdir)
        if not wait_port(_connect_host(self.host), self.port, timeout, self.proc):
            self.stop()
            raise NetworkError(f"the Fleet proxy did not start on {self.host}:{self.port} "
                               f"(see {log})")

    def stop(self) -> None:
        stop(self.proc)
        self.proc = None


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(description="ATOM Fleet proxy (see coordinator/services/fleet_proxy.py)")
    p.add_argument("--listen", required=True, help="HOST:PORT to serve TLS on")
    p.add_argument("--upstream", required=True, help="the SuperLink's loopback HOST:PORT")
    p.add_argument("--certfile", required=True)
    p.add_argument("--keyfile", required=True)
    p.add_argument("--cafile", required=True)
    p.add_argument("--max-body", type=int, default=MAX_BODY)
    args = p.parse_args(argv)
    host, port = _split(args.listen)
    app = make_app(args.upstream, Path(args.cafile), max_body=args.max_body)
    uvicorn.run(app, host=host, port=port, ssl_certfile=args.certfile, ssl_keyfile=args.keyfile,
                log_level="warning", access_log=False, server_header=False, date_header=False,
                lifespan="on", proxy_headers=False, timeout_keep_alive=30,
                limit_concurrency=1024)


if __name__ == "__main__":
    main()
