"""transformers ``Trainer`` support: AdaLoRA's rank allocation without changing the training loop.

    from deltatune.integrations.transformers import AdaLoraCallback
    trainer = Trainer(model=peft_model, args=args, train_dataset=ds, callbacks=[AdaLoraCallback()])

This module imports transformers; ``import deltatune`` does not import this module.

What the callback does:

* ``on_init_end``: turns ``remove_unused_columns`` off (with a warning): the Trainer reads a
  model's forward signature to pick dataset columns, and deltatune's ``PeftModel.forward`` takes
  ``**kwargs``, so every column would be dropped.
* ``on_train_begin``: sets the adapter's ``total_step`` to the number of optimizer steps the Trainer
  will run (``max_steps``, or epochs × batches per epoch / gradient accumulation), warning when it
  differs from the config's value.
* ``on_optimizer_step`` (after ``optimizer.step()``, before ``zero_grad()``, once per optimizer
  step whatever the gradient accumulation): ``update_and_allocate(state.global_step)``, with
  ``global_step`` the number of optimizer steps already completed (0, 1, …), as in PEFT's loop.
  Under DDP each process runs it on gradients that were all-reduced during backward, so every rank
  computes the same masks.
* ``on_save``: the Trainer cannot tell a deltatune model from any ``nn.Module`` and writes its full
  state dict into ``checkpoint-<step>``. The callback adds the adapter in PEFT's format
  (``adapter_model.safetensors`` + ``adapter_config.json``, ranks pruned as ``rank_pattern`` says)
  and rewrites the Trainer's weight file to hold only the adapter tensors (unpruned, under the
  in-memory keys), so ``resume_from_checkpoint`` still loads them; the base weights are not copied.
* ``on_train_end``: warns loudly when training advanced but the allocator never ran, or when the
  kept ranks are still above the target budget (the schedule was not completed).

The importance scores are not saved in checkpoints (nor are they in PEFT): a resumed run restarts
them at zero. Its rank pattern is read back from ``<output_dir>/checkpoint-<step>/adapter_config.json``
when that is the checkpoint it resumes from.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Optional

import torch
from transformers import TrainerCallback

from ..io.files import save_tensors
from ..methods.adalora import AdaLoraModel, find_adalora_model

__all__ = ["AdaLoraCallback"]

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class AdaLoraCallback(TrainerCallback):
    """Runs AdaLoRA's rank allocator inside ``transformers.Trainer``.

    Args:
        set_total_step: make the schedule's ``total_step`` the Trainer's number of optimizer steps.
        adapter_only_checkpoints: write the adapter in PEFT's format into each checkpoint and keep
            only adapter tensors in the Trainer's weight file.
    """

    def __init__(self, set_total_step: bool = True, adapter_only_checkpoints: bool = True) -> None:
        self.set_total_step = set_total_step
        self.adapter_only_checkpoints = adapter_only_checkpoints
        self._tuner: Optional[AdaLoraModel] = None
        self._calls_at_start = 0
        self._step_at_start = 0

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if getattr(args, "remove_unused_columns", False):
            # the Trainer keeps the dataset columns named in the model's forward signature; it reads
            # the base model's signature only for peft's own PeftModel class, and deltatune's
            # forward(*args, **kwargs) names none, so every column would be dropped
            warnings.warn(
                "AdaLoraCallback sets TrainingArguments.remove_unused_columns=False: the Trainer cannot read which "
                "columns a deltatune PeftModel uses. Give it a dataset with only the model's inputs."
            )
            args.remove_unused_columns = False

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise ValueError("AdaLoraCallback needs the Trainer's model")
        tuner = find_adalora_model(model)
        name = tuner._require_trainable()
        config = tuner.peft_config[name]
        total = _total_steps(args, state, kwargs.get("train_dataloader"))
        if self.set_total_step and total and total != config.total_step:
            warnings.warn(
                f"AdaLoRA adapter '{name}': total_step={config.total_step} in the config, but the Trainer runs {total} "
                f"optimizer steps; using total_step={total} (AdaLoraCallback(set_total_step=False) keeps the config's)"
            )
            tuner.set_total_step(total)
        if tuner.optimizer_attached:
            warnings.warn("AdaLoraCallback drives the rank allocator: the optimizer hook from attach_optimizer() is removed")
            tuner.detach_optimizer()
        self._tuner = tuner
        self._calls_at_start = tuner.allocation_calls
        self._step_at_start = state.global_step
        if state.global_step > 0:
            restored = _restore_rank_pattern(args.output_dir, state.global_step, tuner, name)
            warnings.warn(
                f"AdaLoRA: training resumes at step {state.global_step}; the allocator's importance scores restart at "
                f"zero{'; rank_pattern restored from ' + restored if restored else ''}"
            )

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._tuner is not None:
            self._tuner.update_and_allocate(state.global_step)

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if not self.adapter_only_checkpoints or model is None or not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):
            return
        model.save_pretrained(folder)
        adapter_state = _adapter_tensors(model)
        for filename in _WEIGHT_FILES:
            path = os.path.join(folder, filename)
            if os.path.isfile(path):
                save_tensors(adapter_state, path, safe_serialization=filename.endswith(".safetensors"))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        tuner = self._tuner
        if tuner is None:
            return
        steps = state.global_step - self._step_at_start
        if steps > 0 and tuner.allocation_calls == self._calls_at_start:
            warnings.warn(
                f"AdaLoRA: the Trainer ran {steps} optimizer steps but the rank allocator never ran, so no rank was "
                "pruned. This transformers version may not emit on_optimizer_step; call "
                "model.base_model.attach_optimizer(trainer.optimizer) before training instead."
            )
            return
        name = tuner.trainable_adapter_name
        if name is None:
            return
        config = tuner.peft_config[name]
        kept = sum(sum(flags) for flags in (config.rank_pattern or {}).values())
        target = config.target_r * len(tuner.triplets(name))
        if steps > 0 and (config.rank_pattern is None or kept > target):
            warnings.warn(
                f"AdaLoRA: training ended at step {state.global_step} with {kept if config.rank_pattern else 'all'} ranks "
                f"kept, above the target budget {target}: the schedule (total_step={config.total_step}, "
                f"tfinal={config.tfinal}) was not completed"
            )


def _total_steps(args: Any, state: Any, dataloader: Any) -> int:
    """Optimizer steps of the run: the Trainer's own count, else derived from the arguments."""
    if getattr(state, "max_steps", 0) and state.max_steps > 0:
        return int(state.max_steps)
    if args.max_steps and args.max_steps > 0:
        return int(args.max_steps)
    if dataloader is None:
        return 0
    try:
        batches = len(dataloader)
    except TypeError:  # an iterable dataset has no length: nothing to derive
        return 0
    per_epoch = max(batches // args.gradient_accumulation_steps, 1)
    return int(per_epoch * args.num_train_epochs)


def _restore_rank_pattern(output_dir: str, step: int, tuner: AdaLoraModel, name: str) -> Optional[str]:
    """A resumed run needs the rank pattern once past the budgeting phase: read it from the
    checkpoint this run resumes from, when it lies in ``output_dir`` (the usual place)."""
    path = os.path.join(output_dir, f"checkpoint-{step}", "adapter_config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        pattern = json.load(fh).get("rank_pattern")
    if not pattern:
        return None
    tuner.peft_config[name].rank_pattern = {f"{key}.{name}": flags for key, flags in pattern.items()}
    return path


def _adapter_tensors(peft_model: Any) -> dict[str, torch.Tensor]:
    """The model's own state-dict entries that belong to adapters, plus anything trainable."""
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    return {
        k: v for k, v in peft_model.state_dict().items()
        if ".adapters." in k or ".modules_to_save." in k or k in trainable
    }
