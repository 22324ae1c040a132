"""Memory measurement shared by ``deltatune train``/``compare`` (and meant for ``benchmarks/``).

* :func:`peak_tensor_bytes` -- the peak of live tensor bytes a call allocates, replayed from the
  profiler's allocator events (``torch.profiler.profile(profile_memory=True)``): tensor storage
  only, like CUDA's ``max_memory_allocated``, and measured above the level before the call.
* :func:`resident_bytes` -- weights, buffers and optimizer state held between steps.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Callable, Iterator


def peak_tensor_bytes(fn: Callable[[], Any], device: str = "CPU") -> tuple[Any, int]:
    """``(fn(), peak bytes)``: the highest running total of ``device`` allocator events during ``fn()``."""
    from torch.profiler import ProfilerActivity, profile

    with _stderr_to_devnull():  # kineto prints "profiler_start/stop" lines straight to fd 2
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type().name == device]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()  # negative for a free
        peak = max(peak, current)
    return result, peak


def resident_bytes(model: Any, optimizer: Any = None) -> int:
    """Weights, buffers and optimizer state held between steps (each storage counted once)."""
    import torch

    seen: set[int] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()

    for t in model.parameters():
        add(t)
    for t in model.buffers():
        add(t)
    for state in (optimizer.state.values() if optimizer is not None else ()):
        for t in state.values():
            add(t)
    return total


@contextlib.contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real fd 2 (embedded interpreters)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
