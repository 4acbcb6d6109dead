"""Exponential moving average of the weights, kept in CPU memory (DeepSeek-V3 report §3.2.3).

Each rank averages what it owns: the local tensor of every parameter it holds (an FSDP2 /
DTensor shard, an EP expert slice, a pipeline stage's layers, a TP shard), one fp32 CPU
buffer each (pinned when CUDA is available), so nothing is gathered and GPU memory is untouched.

After an optimizer step, `update` snapshots the new weights into CPU buffers and leaves
    ema <- d * ema + (1 - d) * w
to a background thread, so the next step does not wait for it. Why the snapshot never sees
the next step's weights: on CPU the copy is made by `update` itself, before it returns to the
training loop; on CUDA it is a non_blocking copy enqueued on the current stream, and every
kernel of the next step (the optimizer's in-place update included) is enqueued after it on
that stream, so it runs after the copy has read the weights. The background thread waits on
an event recorded after the copy before it reads the snapshot. Each update waits for the
previous one first (its snapshot buffers are reused), and every read (`averages`: checkpoint,
export, evaluation; `close`: the end of training) waits for the pending update.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The part of `t` this rank holds: a DTensor's local shard, or `t` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def check_decay(decay: float, interval: int) -> None:
    """Raise ValueError naming the key: the decay must lie in [0, 1) and the interval be >= 1."""
    if not 0 <= decay < 1:
        raise ValueError(f"train.ema_decay: must be 0 (off) or in (0, 1), e.g. 0.999; got {decay}")
    if interval < 1:
        raise ValueError(f"train.ema_interval: must be >= 1 (update every N optimizer steps), got {interval}")


class WeightEMA:
    """The EMA of one rank's parameters, by parameter name, updated asynchronously."""

    def __init__(self, model: nn.Module, decay: float, interval: int = 1) -> None:
        check_decay(decay, interval)
        self.decay, self.interval = decay, interval
        self.params: dict[str, nn.Parameter] = dict(model.named_parameters())
        self._cuda = pin = torch.cuda.is_available()

        def buffer(p: torch.Tensor) -> torch.Tensor:
            return torch.empty(local_tensor(p).shape, dtype=torch.float32, device="cpu", pin_memory=pin)

        self._average = {n: buffer(p) for n, p in self.params.items()}
        self._snapshot = {n: buffer(p) for n, p in self.params.items()}
        self._worker: Optional[ThreadPoolExecutor] = None
        self._pending: Optional[Future] = None
        self.lag_s = 0.0  # how long the last finished background update took
        self.start_from_weights()

    def start_from_weights(self) -> None:
        """ema <- w: the start of a run (and of a resumed one whose checkpoint has no EMA)."""
        self.wait()
        with torch.no_grad():
            for n, p in self.params.items():
                self._average[n].copy_(local_tensor(p).detach())

    def update(self, step: int) -> None:
        """After optimizer step `step` (1-based): every `interval`-th step, snapshot the weights and
        queue the average's update on the background thread."""
        if step % self.interval:
            return
        self.wait()  # the previous update reads the snapshot buffers
        with torch.no_grad():
            for n, p in self.params.items():
                self._snapshot[n].copy_(local_tensor(p).detach(), non_blocking=True)
        copied = None
        if self._cuda:
            copied = torch.cuda.Event()
            copied.record()
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeforge_ema")
        self._pending = self._worker.submit(self._blend, copied)

    def _blend(self, copied: Optional[torch.cuda.Event]) -> None:
        """ema <- d * ema + (1 - d) * w, on the background thread (the snapshot is scratch)."""
        if copied is not None:
            copied.synchronize()
        t0 = time.perf_counter()
        d = self.decay
        with torch.no_grad():
            for n, average in self._average.items():
                average.mul_(d).add_(self._snapshot[n].mul_(1 - d))
        self.lag_s = time.perf_counter() - t0

    def wait(self) -> None:
        """Finish the pending update (re-raising its error, if any)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def averages(self) -> dict[str, torch.Tensor]:
        """{parameter name: this rank's EMA (fp32, CPU)}, with every queued update applied."""
        self.wait()
        return self._average

    def load(self, averages: dict[str, torch.Tensor]) -> None:
        """Overwrite the EMA with saved values (this rank's local tensors, by name)."""
        self.wait()
        missing = sorted(set(self._average) - set(averages))
        if missing:
            raise ValueError(f"saved EMA lacks parameters {missing[:5]}")
        for n, average in self._average.items():
            average.copy_(averages[n])

    def copy_to_weights(self) -> None:
        """w <- ema: the model then computes with the EMA (evaluation of a finished run)."""
        with torch.no_grad():
            for n, average in self.averages().items():
                local_tensor(self.params[n]).copy_(average)

    def nbytes(self) -> int:
        """Host memory held: the averages and the snapshot buffers."""
        return 2 * sum(t.numel() * t.element_size() for t in self._average.values())

    def close(self) -> None:
        """Finish the pending update and join the background thread (before the process groups end)."""
        try:
            self.wait()
        finally:
            if self._worker is not None:
                self._worker.shutdown(wait=True)
                self._worker = None
