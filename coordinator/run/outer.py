"""The DiLoCo outer optimizer: SGD with (Nesterov) momentum on the aggregated pseudo-gradient.

Same arithmetic as ``torch.optim.SGD(lr, momentum, nesterov=..., dampening=0)``, in numpy so
that the coordinator's aggregation path does not need torch.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["NesterovOuter"]

_PREFIX = "momentum."


class NesterovOuter:
    """Outer SGD with momentum.

    ``delta`` is the aggregated pseudo-gradient (base − local), so it points like a gradient:
    ``buf = momentum*buf + delta`` (``buf = delta`` on the first step, as torch does),
    ``update = delta + momentum*buf`` (Nesterov) or ``buf``, ``new = params − lr*update``.
    """

    def __init__(self, lr: float, momentum: float, nesterov: bool = True) -> None:
        if not lr > 0:
            raise ValueError(f"outer lr must be > 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"outer momentum must be in [0, 1), got {momentum}")
        self.lr, self.momentum, self.nesterov = float(lr), float(momentum), bool(nesterov)
        self._buf: dict[str, np.ndarray] = {}

    def step(self, params: Mapping[str, np.ndarray],
             delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Return the new parameters; ``params`` and ``delta`` are not modified."""
        if params.keys() != delta.keys():
            raise ValueError(f"params and delta name different arrays: "
                             f"{sorted(params.keys() ^ delta.keys())}")
        if self._buf and self._buf.keys() != params.keys():
            raise ValueError("momentum buffers name different arrays than params")
        new, bufs = {}, {}
        for name, p in params.items():
            d = np.asarray(delta[name], dtype=p.dtype)
            if d.shape != p.shape:
                raise ValueError(f"delta {name!r} has shape {d.shape}, params {p.shape}")
            buf = self._buf.get(name)
            buf = d.copy() if buf is None else self.momentum * buf + d
            update = d + self.momentum * buf if self.nesterov else buf
            new[name] = (p - self.lr * update).astype(p.dtype, copy=False)
            bufs[name] = buf
        self._buf = bufs  # only after every array passed its checks
        return new

    def state_dict(self) -> dict[str, np.ndarray]:
        """Momentum buffers as ``"momentum.<name>"`` arrays (empty before the first step)."""
        return {_PREFIX + name: buf.copy() for name, buf in self._buf.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore buffers saved by ``state_dict``."""
        bad = [k for k in state if not k.startswith(_PREFIX)]
        if bad:
            raise ValueError(f"not outer-optimizer state: {bad}")
        self._buf = {k[len(_PREFIX):]: np.array(v, copy=True) for k, v in state.items()}
