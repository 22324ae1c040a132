"""The training loop and evaluation every run shares (every method, both libraries, both tasks).

AdamW, linear warm-up then linear decay, one optimizer step per batch. Measured on the way: step
time as the median over steps of wall time and of the main thread's CPU time (the CPU clock is the
honest one on a shared machine; with one intra-op thread it is the whole cost of the step), and
the peak tensor memory of one training step on top of what is resident between steps.
"""

from __future__ import annotations

import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from .measure import peak_tensor_bytes, resident_bytes
from .options import UsageError
from .tasks import Task

GROUP_CHUNK = 50  # batches per length-sorted chunk with --group-by-length (as transformers' LengthGroupedSampler)


def length_grouped_order(rows: list[dict], batch_size: int, seed: int) -> list[int]:
    """A seeded order whose consecutive ``batch_size`` rows have similar lengths.

    Random order, cut into chunks of 50 batches, each chunk sorted by text length and cut into
    batches, then the batches shuffled: every batch still comes from a random sample of the data,
    but it pads to a length close to its rows' own (about half the tokens on Rotten Tomatoes).
    """
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    chunk = GROUP_CHUNK * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order) - batch_size + 1, chunk):
        part = sorted(order[start : start + chunk], key=lambda i: len(rows[i]["text"]))
        batches += [part[i : i + batch_size] for i in range(0, len(part) - batch_size + 1, batch_size)]
    rng.shuffle(batches)
    return [i for batch in batches for i in batch]


def train_batches(task: Task, tokenizer: Any, rows: list[dict], label_names: list[str], batch_size: int,
                  max_length: int, seed: int, group_by_length: bool = False) -> Iterator[dict]:
    """Endless batches, a new seeded order every epoch (the same for every method)."""
    if len(rows) < batch_size:
        raise UsageError(f"--batch-size {batch_size} is larger than the {len(rows)} training examples")
    epoch = 0
    while True:
        if group_by_length:
            ordered, shuffle = [rows[i] for i in length_grouped_order(rows, batch_size, seed + epoch)], False
        else:
            ordered, shuffle = rows, True
        yield from task.batches(tokenizer, ordered, label_names, batch_size, max_length, seed=seed + epoch,
                                shuffle=shuffle, drop_last=True)
        epoch += 1


def evaluate(model: Any, tokenizer: Any, task: Task, rows: list[dict], label_names: list[str], batch_size: int,
             max_length: int, progress: bool = False) -> float:
    """Accuracy on ``rows``; rows are batched by length (less padding, same result)."""
    import torch

    order = sorted(rows, key=lambda r: len(r["text"]))
    was_training = model.training
    model.eval()
    correct = total = 0
    bar = progress_bar(math.ceil(len(rows) / batch_size), "evaluating", progress, unit="batch", leave=False)
    with torch.no_grad():
        for batch in task.batches(tokenizer, order, label_names, batch_size, max_length):
            predicted, truth = task.predictions(model, tokenizer, batch, label_names)
            correct += int((predicted == truth).sum())
            total += int(truth.numel())
            bar.update(1)
    bar.close()
    model.train(was_training)
    return correct / max(total, 1)


def progress_bar(total: int, desc: str, enabled: bool, **kwargs: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, file=sys.stderr, **kwargs)


def lr_factor(step: int, warm: int, total: int) -> float:
    """Linear warm-up over ``warm`` steps, then linear decay to zero at ``total``."""
    if warm and step < warm:
        return (step + 1) / warm
    return max(0.0, (total - step) / max(1, total - warm))


@dataclass
class LoopStats:
    losses: list[float] = field(default_factory=list)
    step_wall_s: Optional[float] = None  # median over the timed steps
    step_cpu_s: Optional[float] = None
    train_wall_s: float = 0.0
    peak_memory_bytes: Optional[int] = None  # resident + the profiled step's peak

    @property
    def final_loss(self) -> float:
        recent = self.losses[-20:]
        return sum(recent) / len(recent)


def train_loop(model: Any, optimizer: Any, batches: Iterator[dict], steps: int, warmup: float,
               after_step: Optional[Callable[[int], None]] = None, measure_memory: bool = True,
               progress: bool = False, label: str = "") -> LoopStats:
    """``steps`` optimizer steps on ``batches`` with the shared schedule; returns the measurements."""
    import torch

    warm = max(1, round(warmup * steps)) if warmup > 0 else 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warm, steps))
    stats = LoopStats()
    walls: list[float] = []
    cpus: list[float] = []
    peak_step = resident = 0
    profiled_step = min(1, steps - 1)  # step 0 allocates the optimizer state
    model.train()
    bar = progress_bar(steps, f"training {label}", progress, unit="step")
    start = time.perf_counter()
    for step in range(steps):
        batch = next(batches)

        def one_step() -> float:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            if after_step is not None:
                after_step(step)
            optimizer.zero_grad(set_to_none=True)
            return float(loss.detach())

        profiled = measure_memory and step == profiled_step
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        if profiled:
            resident = resident_bytes(model, optimizer)
            loss_value, peak_step = peak_tensor_bytes(one_step)
        else:
            loss_value = one_step()
        wall, cpu = time.perf_counter() - wall0, time.thread_time() - cpu0
        if not math.isfinite(loss_value):
            bar.close()
            raise UsageError(f"the loss became {loss_value} at step {step + 1}: lower --lr "
                             f"(now {optimizer.param_groups[0]['initial_lr']:g})")
        stats.losses.append(loss_value)
        # the first steps allocate optimizer state and warm caches; the profiled step is slower
        if (step >= 2 or steps <= 3) and not (profiled and steps > 1):
            walls.append(wall)
            cpus.append(cpu)
        bar.set_postfix(loss=f"{stats.final_loss:.4f}", step_s=f"{wall:.2f}", refresh=False)
        bar.update(1)
    bar.close()
    stats.train_wall_s = time.perf_counter() - start
    stats.step_wall_s = statistics.median(walls) if walls else None
    stats.step_cpu_s = statistics.median(cpus) if cpus else None
    if measure_memory:
        stats.peak_memory_bytes = (resident or resident_bytes(model, optimizer)) + peak_step
    return stats
