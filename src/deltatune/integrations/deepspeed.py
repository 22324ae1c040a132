"""deltatune adapters under DeepSpeed ZeRO (stages 1, 2 and 3), directly or through 🤗 accelerate.

    model = dt.get_peft_model(base, config)           # or: build base (and adapter) inside deepspeed.zero.Init
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trainable, lr), config=ds_config)
    attach_adalora(engine)                             # AdaLoRA only: rank allocation at every optimizer step
    for batch in loader:
        engine.backward(engine(**batch).loss)
        engine.step()
    save_on_main(engine, "out")                        # ZeRO-3 adapter tensors gathered, rank 0 writes

What holds, and why:

* Adapters are plain parameters and buffers, so ZeRO shards, reduces and steps them like any other
  weight. Tensors an :class:`~deltatune.core.layer.AdapterLayer` reads outside their own module's
  forward (BAT reads ``base_layer.weight``; deltas run through ``delta_out``) are gathered by ZeRO-3
  all the same: it registers a partitioned parameter read inside a module's forward as an external
  parameter of that module.
* ``deepspeed.zero.Init`` may wrap both the base model and ``get_peft_model``: the adapter's own
  parameters are then partitioned from birth. Frozen random state (FourierFT's positions, RandLoRA's
  bases) is in buffers, which ZeRO never partitions; the config's seed makes them equal on every
  rank (``deltatune.integrations.distributed.check_replicated`` proves it).
* AdaLoRA's allocator reads whole gradients and weights and masks E. Under ZeRO they live in
  DeepSpeed's partitions: :meth:`AdaLoraModel.update_and_allocate` reads them through
  ``deepspeed.utils`` (``safe_get_full_grad``, ``safe_get_full_fp32_param``), the same values on every
  rank, so every rank computes the same rank pattern, and writes the masked E to DeepSpeed's fp32
  master copy and to the model's weights. ``engine.step()`` frees the gradients, so they are read
  before it: :func:`attach_adalora` wraps the engine's ``step`` to read them, step, then allocate —
  PEFT's order (backward, optimizer step, ``update_and_allocate``). accelerate's
  ``accelerator.backward(loss)`` calls ``engine.backward`` and ``engine.step()`` itself, so attaching to
  the prepared engine is the one line an accelerate loop needs.
* Saving: ``deltatune.integrations.distributed.save_on_main`` gathers ZeRO-3 adapter tensors on every
  rank (``GatheredParameters``) and rank 0 alone writes; the files are the ordinary PEFT format and load
  into a model without DeepSpeed.
* Merging writes a base weight that ZeRO-3 partitions: save the adapter and merge it into an
  unpartitioned model instead.

Import ``transformers``' model classes before entering ``zero.Init``: it patches tensor creation, and
importing ``torch._dynamo`` (which transformers pulls in lazily) inside it fails.

This module never imports DeepSpeed itself; the AdaLoRA code it drives imports it where it runs.
"""

from __future__ import annotations

from typing import Any, Optional

import torch.nn as nn

from .distributed import unwrap_model

__all__ = ["AdaLoraAttachment", "attach_adalora"]


def _adalora_tuner(engine: nn.Module):
    from ..methods.adalora import AdaLoraModel

    inner = unwrap_model(getattr(engine, "module", engine))
    tuner = inner if isinstance(inner, AdaLoraModel) else getattr(inner, "base_model", None)
    if not isinstance(tuner, AdaLoraModel):
        raise TypeError(f"{type(engine).__name__} holds no deltatune AdaLoRA model (PeftModel with an AdaLoraConfig)")
    return tuner


class AdaLoraAttachment:
    """The handle :func:`attach_adalora` returns; :meth:`remove` restores the engine's own ``step``."""

    def __init__(self, engine: Any, tuner: Any, original: Any, start_step: int) -> None:
        self.engine, self.tuner, self._original = engine, tuner, original
        self.optimizer_step = start_step  # the step update_and_allocate gets next

    def step(self, *args: Any, **kwargs: Any) -> Any:
        engine, tuner = self.engine, self.tuner
        boundary = engine.is_gradient_accumulation_boundary()  # micro-steps that do not update are skipped
        if boundary:
            tuner.capture_gradients()  # engine.step() frees them
        out = self._original(*args, **kwargs)
        if boundary and engine.was_step_applied():  # a step skipped for fp16 overflow is not counted
            tuner.update_and_allocate(self.optimizer_step)
            self.optimizer_step += 1
        return out

    def remove(self) -> None:
        if self.engine.__dict__.get("step") == self.step:
            del self.engine.__dict__["step"]
        self.engine.__dict__.pop("_deltatune_adalora", None)


def attach_adalora(engine: Any, start_step: int = 0) -> AdaLoraAttachment:
    """Run AdaLoRA's rank allocation after every optimizer step of a DeepSpeed ``engine`` (the object
    ``deepspeed.initialize`` or ``accelerator.prepare`` returned), counting steps from ``start_step``.

    The engine's ``step`` is wrapped on this instance: at a gradient-accumulation boundary it reads the
    adapter's whole gradients (before DeepSpeed frees them), runs DeepSpeed's step, then calls
    ``update_and_allocate(step)``. Every rank must attach (the reads gather across ranks).
    """
    if not hasattr(engine, "was_step_applied") or not hasattr(engine, "is_gradient_accumulation_boundary"):
        raise TypeError(f"attach_adalora needs a DeepSpeed engine (deepspeed.initialize's first result), got {type(engine).__name__}")
    previous: Optional[AdaLoraAttachment] = engine.__dict__.get("_deltatune_adalora")
    if previous is not None:
        previous.remove()
    tuner = _adalora_tuner(engine)
    tuner._require_trainable()
    handle = AdaLoraAttachment(engine, tuner, engine.step, start_step)
    engine.__dict__["step"] = handle.step  # instance attribute: accelerate's wrapper calls engine.step() too
    engine.__dict__["_deltatune_adalora"] = handle
    return handle
