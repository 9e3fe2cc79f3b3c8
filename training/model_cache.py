"""One built model per architecture, kept by a warm worker and reused by every lease.

A fresh model per lease pays its initialisation (a random draw for every weight) and, under
``torch.compile``, a compilation that takes seconds to minutes. A node trains lease after
lease of one run, so ``ModelCache.load`` builds (and compiles) the model once per
architecture and device, and on every later lease refills its parameters in place from the
lease's base (``training.state.load_arrays``): the compiled graph stays valid and is not
traced again.

On CPU a reused module gives the bit-identical pseudo-gradient a fresh build gives
(tests/unit/test_model_cache.py): its parameters are the lease's base, its gradients are
cleared, it is put back in train mode, ``train_inner`` makes the lease's own optimizer and
seeds the global RNG with the lease's seed. One case would differ: a fresh build draws from
the CPU generator before training, so on CPU a model with dropout would draw other masks from
a reused module; such a model is built afresh each lease and never kept. (On CUDA dropout
draws from the CUDA generator, which the CPU-side build does not touch.)

``use_compile=None`` compiles on CUDA only, where inductor's fused kernels are what the
compile is for. On CPU it does not pay: GPT tiny took 61 s to compile on 2 cores and its
later leases were no faster than eager (0.5-1.1 s for 5 steps either way); ``atom-node join
--compile on|off`` overrides it (``COMPILE_CHOICES``). A model that fails to compile runs
eager from then on (logged once): its forward is compiled on the first call, but its
backward only on the first ``backward()``, so ``forward_backward`` is the training step
that catches both and redoes the failed step eager — a broken compiler costs a node one
step, not its lease.

The compile depends on the architecture and the batch's shape, not on the weights, so
``ModelCache.warm`` can compile a model before its first lease's base has arrived: the
worker runs it while the lease's downloads run on a thread (``node.worker``), and the first
lease then pays max(download, compile) instead of their sum.

Not thread-safe: one lease at a time, as the warm worker runs them.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from training.device import autocast
from training.families import HFSpec, ModelSpec, arch_of, build_model
from training.state import arrays_to_model, load_arrays

__all__ = ["COMPILE_CHOICES", "Built", "ModelCache", "build", "compile_choice",
           "forward_backward"]

log = logging.getLogger(__name__)

Forward = Callable[..., Any]

# ``atom-node join --compile``: auto compiles on CUDA only (see the module docstring)
COMPILE_CHOICES: dict[str, bool | None] = {"auto": None, "on": True, "off": False}


def compile_choice(text: str) -> bool | None:
    """``ModelCache``'s ``use_compile`` for ``--compile TEXT``.

    Raises
    ------
    ValueError
        ``text`` is not one of ``COMPILE_CHOICES``.
    """
    try:
        return COMPILE_CHOICES[text.strip().lower()]
    except KeyError:
        raise ValueError(f"--compile must be one of {', '.join(COMPILE_CHOICES)}, "
                         f"got {text!r}") from None


@dataclass(frozen=True)
class Built:
    """A model ready for a lease: ``module`` holds the parameters (load, read, modes);
    ``forward`` is what the training steps call, the compiled module or ``module`` itself."""

    module: torch.nn.Module
    forward: Forward


def build(base: Mapping[str, np.ndarray] | None, cfg: ModelSpec, device: torch.device, *,
          checkpointing: bool = False) -> Built:
    """A fresh model holding ``base`` on ``device`` (what ``train_inner`` does without a
    cache; None: its initial weights), with activation checkpointing when asked."""
    module = build_model(cfg).to(device) if base is None else arrays_to_model(base, cfg, device)
    if checkpointing:
        module.activation_checkpointing_enable()
    return Built(module, module)


class ModelCache:
    """The models a warm worker built, by architecture, device and checkpointing; the
    ``keep`` most recently used are held (the default 1: a node works for one run, and a
    second model idle on the GPU is memory a lease could use).

    ``builds`` and ``reuses`` count what ``load`` did; ``backend`` is ``torch.compile``'s
    (tests pass a cheap one that counts compilations).
    """

    def __init__(self, *, use_compile: bool | None = None, backend: str | Callable = "inductor",
                 keep: int = 1) -> None:
        self.use_compile, self.backend, self.keep = use_compile, backend, keep
        self._held: OrderedDict[tuple[Any, ...], Built] = OrderedDict()
        self.builds = 0
        self.reuses = 0

    def compiles(self, device: torch.device) -> bool:
        return device.type == "cuda" if self.use_compile is None else self.use_compile

    def load(self, base: Mapping[str, np.ndarray], cfg: ModelSpec, device: torch.device, *,
             checkpointing: bool = False) -> Built:
        """The model for ``cfg`` on ``device`` holding ``base``, in train mode with no
        gradients: the held one refilled, else a new one (kept, compiled where it pays).

        Call it where a fresh build would be called (after seeding the RNG): a model that
        is built here draws its initial weights as ``build`` does.

        Raises
        ------
        ValueError
            If ``base``'s names or shapes do not match ``cfg``.
        """
        if _draws_on_cpu(cfg, device):
            self.builds += 1
            return build(base, cfg, device, checkpointing=checkpointing)
        key = _key(cfg, device, checkpointing)
        held = self._held.get(key)
        if held is None:
            held = self._keep(key, build(base, cfg, device, checkpointing=checkpointing).module,
                              device)
        else:
            load_arrays(held.module, base)
            self._held.move_to_end(key)
            self.reuses += 1
        # a lease that failed mid-step may have left gradients or eval mode behind
        for p in held.module.parameters():
            p.grad = None
        held.module.train()
        return held

    def holds(self, cfg: ModelSpec, device: torch.device, checkpointing: bool = False) -> bool:
        """Whether a ``load`` of ``cfg`` on ``device`` would refill a held model."""
        return _key(cfg, device, checkpointing) in self._held

    def warm(self, cfg: ModelSpec, device: torch.device, *, batch_size: int, seq_len: int,
             checkpointing: bool = False) -> bool:
        """Build ``cfg``'s model on ``device`` and compile it before its first lease: one
        training step's forward and backward on a batch of zeros of the lease's shape (the
        compiled graphs are specialised to it), its gradients then dropped. The next
        ``load`` of ``cfg`` refills this model. Returns False, doing nothing, where nothing
        would be compiled or the model is held already. The caller's RNG is left as it was.
        """
        key = _key(cfg, device, checkpointing)
        if not self.compiles(device) or _draws_on_cpu(cfg, device) or key in self._held:
            return False
        cuda = [device.index if device.index is not None else torch.cuda.current_device()
                ] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            module = build(None, cfg, device, checkpointing=checkpointing).module
            held = self._keep(key, module, device)
            # drawn as the lease's batches are (views of one window: their strides are
            # guarded too, and other strides would compile again)
            from training.inner import sample_batch  # inner imports this module

            zeros = torch.zeros(seq_len + 1, dtype=torch.long, device=device)
            x, y = sample_batch(zeros, batch_size, seq_len, torch.Generator().manual_seed(0))
            forward_backward(held, x, y, device)
        for p in module.parameters():
            p.grad = None
        return True

    def _keep(self, key: tuple[Any, ...], module: torch.nn.Module, device: torch.device
              ) -> Built:
        """Hold a newly built model (compiled where it pays) under ``key``; the least
        recently used beyond ``keep`` are dropped."""
        held = Built(module, _Compiled(module, self.backend) if self.compiles(device)
                     else module)
        self._held[key] = held
        self.builds += 1
        while len(self._held) > self.keep:
            self._held.popitem(last=False)
        return held


def _key(cfg: ModelSpec, device: torch.device, checkpointing: bool) -> tuple[Any, ...]:
    return (tuple(sorted(arch_of(cfg).items())), str(device), checkpointing)


def _draws_on_cpu(cfg: ModelSpec, device: torch.device) -> bool:
    """Whether training ``cfg`` on ``device`` draws from the CPU generator (dropout on
    CPU): then only a fresh build reproduces a fresh build's masks."""
    dropout = 0.0 if isinstance(cfg, HFSpec) else cfg.dropout  # transformers: always 0
    return device.type == "cpu" and dropout > 0


def forward_backward(built: Built, x: torch.Tensor, y: torch.Tensor,
                     device: torch.device) -> torch.Tensor:
    """One training step's forward (under ``autocast``) and backward; its loss.

    Until a compiled model has run one backward, a failure of that backward is taken for its
    lazily compiled backward failing: the model runs eager from then on and the step is
    redone eager, from cleared gradients (an error eager shares is raised by the redo)."""
    with autocast(device):
        _, loss = built.forward(x, y)
    compiled = built.forward if isinstance(built.forward, _Compiled) else None
    if compiled is None or compiled.proven:
        loss.backward()
        return loss
    try:
        loss.backward()
    except Exception as err:  # noqa: BLE001 - any compiler failure; eager re-raises a real one
        compiled.give_up(err)
        built.module.zero_grad(set_to_none=True)
        with autocast(device):
            _, loss = built.forward(x, y)
        loss.backward()
        return loss
    compiled.proven = True
    return loss


class _Compiled:
    """``torch.compile(module)``, compiled on its first call; eager for good if its forward
    or (``forward_backward``) its first backward fails: a node without a working compiler
    still trains."""

    def __init__(self, module: torch.nn.Module, backend: str | Callable) -> None:
        self.module = module
        self.fn: Forward = torch.compile(module, backend=backend)
        self.proven = False  # a forward and a backward compiled and ran

    def give_up(self, err: BaseException) -> None:
        log.warning("torch.compile failed, training this model eager: %s",
                    str(err).splitlines()[0][:300] if str(err) else type(err).__name__)
        self.fn = self.module

    def __call__(self, *args: Any) -> Any:
        if self.fn is self.module:
            return self.module(*args)
        try:
            return self.fn(*args)
        except Exception as err:  # noqa: BLE001 - any compiler failure; eager re-raises a real one
            if self.proven and not isinstance(err, torch._dynamo.exc.TorchDynamoException):
                raise  # compiled before, so not the compiler: a real error of this batch
            self.give_up(err)
            return self.module(*args)
