"""What the contribution policy needs from the GPU: is someone else using it, and a memory cap.

"Busy" is read through NVML (the ``nvidia-ml-py`` package, ``import pynvml``): a process that
is not ours holding memory or compute on our device, or, with ``gpu_busy_percent``, the
device's utilization above that while no lease of ours runs (while one does, the utilization
is mostly ours). NVML is optional: a node without it works as before, and asking for
``pause_when_gpu_busy`` without it is a one-line ``ConfigError`` at ``join``.

NVML numbers devices as the driver does, ignoring ``CUDA_VISIBLE_DEVICES``; a batch scheduler
sets that variable to the GPUs of the job (indices or ``GPU-...`` UUIDs), so ``cuda:N`` is
looked up through it.

Known limit: in a container with its own pid namespace NVML reports host pids, which never
match ours: every process on the GPU, ours included, then counts as another's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection
from typing import Any

from protocol.errors import ConfigError, ProtocolError


__all__ = [
    "NvmlProbe", "cap_memory", "check_memory", "cuda_index", "gpu_count", "load_nvml",
]

log = logging.getLogger(__name__)

_NEEDS_NVML = "pause_when_gpu_busy needs NVML: pip install nvidia-ml-py"
# fp32 weights, gradients and AdamW's two moments; evaluation holds the weights only.
# Activations come on top: this is a floor, cheap to know before anything is fetched.
_TRAIN_BYTES_PER_PARAM = 16
_EVAL_BYTES_PER_PARAM = 4


def load_nvml() -> Any:
    """The ``pynvml`` module, initialised; ``ConfigError`` (one line) if it is missing or
    the driver does not answer."""
    try:
        import pynvml
    except ImportError:
        raise ConfigError(_NEEDS_NVML) from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        raise ConfigError(f"pause_when_gpu_busy: NVML does not answer ({err})") from None
    return pynvml


def cuda_index(device: str) -> int:
    """The CUDA ordinal ``--device`` names (``auto`` and ``cuda``: 0); ``ConfigError`` for
    the CPU, where there is no GPU to watch."""
    if device in ("auto", "cuda"):
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    raise ConfigError(f"pause_when_gpu_busy needs a CUDA device, not --device {device}")


class NvmlProbe:
    """``GpuProbe`` over NVML for one CUDA device: why it is busy, or None."""

    def __init__(self, nvml: Any, index: int, own_pids: Collection[int] = (),
                 busy_percent: int = 0, visible: str | None = None) -> None:
        self.nvml, self.busy_percent = nvml, busy_percent
        self.own = set(own_pids) or {os.getpid()}
        if visible is None:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        self.handle = self._handle(index, visible)

    def _handle(self, index: int, visible: str | None) -> Any:
        entries = [e.strip() for e in visible.split(",")] if visible else []
        name = entries[index] if index < len(entries) else str(index)
        try:
            if name.isdigit():
                return self.nvml.nvmlDeviceGetHandleByIndex(int(name))
            return self.nvml.nvmlDeviceGetHandleByUUID(name)
        except self.nvml.NVMLError as err:
            raise ConfigError(f"pause_when_gpu_busy: NVML has no GPU {name} "
                              f"(cuda:{index}): {err}") from None

    def __call__(self, working: bool) -> str | None:
        nvml = self.nvml
        try:
            procs = [*nvml.nvmlDeviceGetComputeRunningProcesses(self.handle),
                     *nvml.nvmlDeviceGetGraphicsRunningProcesses(self.handle)]
            others = [p for p in procs if p.pid not in self.own]
            if others:
                mib = sum(p.usedGpuMemory or 0 for p in others) / 2**20
                pids = ", ".join(str(p.pid) for p in others[:3])
                return f"the GPU is in use by another process (pid {pids}; {mib:,.0f} MiB)"
            if self.busy_percent and not working:
                used = nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu
                if used > self.busy_percent:
                    return f"the GPU is {used}% busy (this node pauses above " \
                           f"{self.busy_percent}%)"
        except nvml.NVMLError as err:
            # the owner asked not to be in the way: when NVML cannot tell, stay away
            log.warning("NVML failed: %s", err)
            return f"cannot read the GPU's use from NVML ({err})"
        return None


def gpu_count(gpus: str, device: str, available: int | None = None) -> int:
    """The processes ``join --gpus N|all`` asks for: the inner loop runs data-parallel over
    that many GPUs (``training.data_parallel``) when it is more than 1.

    ``all`` is every GPU torch sees (1 on a machine without one: the CPU). ``available``
    replaces ``torch.cuda.device_count()`` (tests).

    Raises
    ------
    ConfigError
        If ``gpus`` is not a positive count or ``all``, asks for more GPUs than there are,
        or asks for more than one with ``--device cpu`` or one named ``cuda:N``.
    """
    text = gpus.strip().lower()
    want = 0
    if text != "all":
        try:
            want = int(text)
        except ValueError:
            pass
        if want < 1:
            raise ConfigError(f"--gpus: expected a count >= 1 or 'all', got {gpus!r}")
        if want == 1:
            return 1  # the default: no need to import torch to count devices
    if available is None:
        import torch

        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if text == "all":
        want = max(1, available)
    if want == 1:
        return 1
    if available == 0:
        raise ConfigError(f"--gpus {want}: this machine has no CUDA GPU; data-parallel "
                          "training needs one GPU per process (use --gpus 1)")
    if want > available:
        raise ConfigError(f"--gpus {want}: only {available} GPU(s) available")
    if device.strip().lower() not in ("auto", "cuda"):
        raise ConfigError(f"--gpus {want} trains on cuda:0..{want - 1}: use it with --device "
                          f"auto or cuda, not {device!r}")
    return want


def cap_memory(device: Any, cap: int) -> None:
    """Hold this process to ``cap`` bytes of ``device``'s memory (CUDA only): an
    allocation beyond it raises out-of-memory here instead of crowding the owner's work."""
    if not cap or getattr(device, "type", "cpu") != "cuda":
        return
    import torch

    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)


def check_memory(kind: str, params: int, cap: int) -> None:
    """Refuse (``ProtocolError``) work whose model of ``params`` parameters alone would
    not fit in ``cap`` bytes: weights, gradients and optimizer state, before anything is
    fetched."""
    if not cap:
        return
    per = _TRAIN_BYTES_PER_PARAM if kind == "train" else _EVAL_BYTES_PER_PARAM
    need = params * per
    if need > cap:
        raise ProtocolError(f"work refused: the model needs at least {need / 2**30:.1f} GiB "
                            f"of GPU memory, over this node's max_gpu_memory "
                            f"{cap / 2**30:.1f} GiB")
