"""AdaLoRA in a hand-written PyTorch training loop: the rank allocation tied to the optimizer.

    model = dt.get_peft_model(base, dt.AdaLoraConfig(total_step=steps, ...))
    attach_optimizer(model, optimizer)          # update_and_allocate(step) after every optimizer.step()
    for batch in loader:
        model(**batch).loss.backward()          # the loss includes the orthogonality term
        optimizer.step()                        # ... and the allocation runs here
        optimizer.zero_grad()

The allocation must run after the optimizer step and before ``zero_grad()`` (it reads the
gradients), once per optimizer step. An optimizer step post-hook is exactly that: gradient
accumulation is handled (micro-batches that do not step are not counted) and a step the AMP grad
scaler skips (inf/NaN gradients) is not counted either. ``transformers.Trainer`` users take
``deltatune.integrations.transformers.AdaLoraCallback``, DeepSpeed users
``deltatune.integrations.deepspeed.attach_adalora``.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
import torch.nn as nn

from ..methods.adalora import AdaLoraModel, find_adalora_model, orthogonal_regularization

__all__ = ["AllocationHook", "attach_optimizer", "detach_optimizer", "find_adalora_model", "optimizer_attached",
           "orthogonal_regularization"]

_HOOKS: "weakref.WeakKeyDictionary[AdaLoraModel, AllocationHook]" = weakref.WeakKeyDictionary()


class AllocationHook:
    """The handle :func:`attach_optimizer` returns: ``step`` is the step the next allocation gets."""

    def __init__(self, tuner: AdaLoraModel, optimizer: torch.optim.Optimizer, start_step: int) -> None:
        self.tuner = tuner
        self.step = start_step
        self._handle = optimizer.register_step_post_hook(self._after_step)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.tuner.update_and_allocate(self.step)
        self.step += 1

    @property
    def attached(self) -> bool:
        hooks = self._handle.hooks_dict_ref()
        return hooks is not None and self._handle.id in hooks

    def remove(self) -> None:
        self._handle.remove()
        if _HOOKS.get(self.tuner) is self:
            del _HOOKS[self.tuner]


def attach_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, start_step: int = 0) -> AllocationHook:
    """Run ``update_and_allocate`` after every ``optimizer.step()`` of ``model``'s AdaLoRA adapter
    (``model``: a ``PeftModel``, its ``AdaLoraModel`` or a DDP wrapper), counting from ``start_step``.
    A hook attached before to the same model is replaced (with a warning)."""
    tuner = find_adalora_model(model)
    tuner._require_trainable()
    if optimizer_attached(tuner):
        warnings.warn("AdaLoRA: an optimizer was already attached; it is replaced by the new one")
        detach_optimizer(tuner)
    hook = _HOOKS[tuner] = AllocationHook(tuner, optimizer, start_step)
    return hook


def detach_optimizer(model: nn.Module) -> None:
    """Remove the hook :func:`attach_optimizer` added to ``model`` (nothing if none)."""
    hook = _HOOKS.get(find_adalora_model(model))
    if hook is not None:
        hook.remove()


def optimizer_attached(model: nn.Module) -> bool:
    """Whether an optimizer hook from :func:`attach_optimizer` runs ``model``'s allocation."""
    hook = _HOOKS.get(find_adalora_model(model))
    return hook is not None and hook.attached
