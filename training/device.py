"""Device choice, mixed precision and CPU thread count, in one place."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from protocol.errors import ConfigError

__all__ = ["pick_device", "autocast", "set_threads"]


def pick_device(pref: str = "auto") -> torch.device:
    """Return the torch device for ``pref``: "auto" (CUDA when present), "cpu", "cuda" or "cuda:N".

    Raises
    ------
    ConfigError
        If ``pref`` is not a known device, or names CUDA on a machine without it.
    """
    pref = (pref or "auto").strip().lower()
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(pref)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device: unknown device {pref!r} (use auto, cpu or cuda)") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ConfigError(f"device: {pref!r} is not supported (use auto, cpu or cuda)")
    if not torch.cuda.is_available():
        raise ConfigError(f"device: {pref!r} requested but CUDA is not available")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device: {pref!r} requested but only {torch.cuda.device_count()} GPU(s)")
    return dev


@contextlib.contextmanager
def autocast(device: torch.device) -> Iterator[None]:
    """bf16 autocast on CUDA (halves activation memory, uses tensor cores); no-op on CPU.

    CPU stays in fp32: CPU bf16 is slow on most machines and would break the
    bit-for-bit determinism of the inner loop that tests and the verifier rely on.
    """
    if device.type == "cuda":
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


def set_threads(n: int | None) -> None:
    """Limit torch's intra-op CPU threads to ``n`` (None or <= 0 keeps torch's default).

    Several nodes sharing one machine should each take a slice of the cores instead of
    all fighting over every core.
    """
    if n is None or n <= 0:
        return
    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):
        # Only settable before the first inter-op parallel work; harmless to skip later.
        torch.set_num_interop_threads(max(1, min(n, 4)))
