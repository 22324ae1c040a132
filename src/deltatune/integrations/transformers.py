"""transformers ``Trainer`` support: adapter-only checkpoints, exact resume, AdaLoRA's allocator.

    from deltatune.integrations.transformers import AdapterTrainer
    trainer = AdapterTrainer(model=peft_model, args=args, train_dataset=ds)   # any method

This module imports transformers; ``import deltatune`` does not import this module.

The plain ``transformers.Trainer`` already trains a deltatune model and resumes it exactly: it
sees an ``nn.Module``, writes ``model.state_dict()`` (base weights included; a tied weight once,
see ``deltatune.peft_model``) to ``checkpoint-N/model.safetensors`` and loads it back with
``load_state_dict(strict=False)`` on ``resume_from_checkpoint`` and ``load_best_model_at_end``.
What it cannot know is that only the adapter matters. :class:`AdapterTrainer` (or
:class:`AdapterTrainerMixin` on another ``Trainer`` subclass, as
``deltatune.integrations.trl`` does) adds:

* ``checkpoint-N/`` and ``save_model()`` folders in PEFT's format (``adapter_config.json`` +
  ``adapter_model.safetensors``, loadable by ``PeftModel.from_pretrained`` of deltatune or PEFT),
  no base weights; checkpoints also hold ``adapter_resume.safetensors``, the live trainable
  tensors under the model's own keys (AdaLoRA's PEFT file is pruned to the kept ranks and cannot
  be loaded back into the training model), which resume and ``load_best_model_at_end`` load;
* the dataset columns and label names of the base model's ``forward`` (a config without
  ``task_type`` gives a ``PeftModel`` whose ``forward(*args, **kwargs)`` names no column);
* :class:`AdaLoraCallback` for an AdaLoRA model, unless one is passed.

:class:`AdaLoraCallback` runs AdaLoRA's rank allocator (with the plain ``Trainer`` as well):

* ``on_train_begin``: sets the adapter's ``total_step`` to the Trainer's optimizer steps; when
  resuming, restores the allocator (importance EMAs, rank pattern) from the checkpoint's
  ``adalora_allocator.safetensors``, so the resumed run allocates as the uninterrupted one;
* ``on_optimizer_step`` (after ``optimizer.step()``, before ``zero_grad()``, once per optimizer
  step whatever the gradient accumulation): ``update_and_allocate(state.global_step)``;
* ``on_save``: writes the allocator state into ``checkpoint-N/``; with the plain Trainer it also
  writes the adapter in PEFT's format there and rewrites the Trainer's weight file to hold only the
  adapter tensors (resume loads them with ``strict=False``);
* ``on_train_end``: warns when the allocator never ran or the schedule was not completed.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from typing import Any, Optional

import torch
from transformers import Trainer, TrainerCallback

from ..io.files import load_tensors, save_tensors
from ..io.state_dict import set_peft_model_state_dict
from ..methods.adalora import AdaLoraModel, find_adalora_model
from .adalora import detach_optimizer, optimizer_attached
from ..core.tuner import peel
from ..peft_model import PeftModel

__all__ = ["AdaLoraCallback", "AdapterTrainer", "AdapterTrainerMixin", "RESUME_NAME", "ALLOCATOR_NAME"]

RESUME_NAME = "adapter_resume.safetensors"  # live trainable tensors, for resume and load_best_model_at_end
ALLOCATOR_NAME = "adalora_allocator.safetensors"  # AdaLoRA's importance EMAs and rank pattern
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_ALLOCATOR_FORMAT = "deltatune-adalora-allocator-1"


# ----------------------------------------------------------------------------- helpers


def unwrap_peft_model(model: Any) -> PeftModel:
    """The deltatune ``PeftModel`` inside ``model`` (DDP / accelerate / compile wrappers peeled)."""
    found = next((m for m in peel(model) if isinstance(m, PeftModel)), None)
    if found is None:
        raise TypeError(f"expected a deltatune PeftModel (from deltatune.get_peft_model), got {type(model).__name__}")
    return found


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The live trainable tensors (adapters, modules_to_save, trainable biases) under the model's keys."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_adapter_state(model: PeftModel, folder: str) -> None:
    """Load a checkpoint's adapter into the live model, in place (the optimizer keeps its tensors).

    ``adapter_resume.safetensors`` when the folder has one, else the PEFT-format adapter (exact for
    every method but a pruned AdaLoRA adapter, whose ranks PEFT's file no longer holds)."""
    path = os.path.join(folder, RESUME_NAME)
    if os.path.isfile(path):
        from safetensors.torch import load_file

        state = load_file(path)
        expected = adapter_state(model)
        unexpected = sorted(set(state) - set(expected))
        missing = sorted(set(expected) - set(state))
        if unexpected or missing:
            raise ValueError(
                f"{path} does not match the model's trainable tensors: unexpected {unexpected[:3]}, missing {missing[:3]}"
            )
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in state:
                    param.copy_(state[name])
        return
    name = model.active_adapter
    config = model.peft_config[name]
    if getattr(config, "rank_pattern", None):
        raise ValueError(
            f"{folder} has no {RESUME_NAME}; its AdaLoRA adapter '{name}' is pruned to rank_pattern and cannot be "
            "loaded back into the training model"
        )
    set_peft_model_state_dict(model.base_model, load_tensors(folder), name)


def save_allocator_state(tuner: AdaLoraModel, folder: str, global_step: int) -> None:
    state = tuner.allocator_state_dict()
    tensors = {f"exp_avg_ipt/{k}": v for k, v in state["exp_avg_ipt"].items()}
    tensors.update({f"exp_avg_unc/{k}": v for k, v in state["exp_avg_unc"].items()})
    meta = {"rank_pattern": state["rank_pattern"], "init_bgt": state["init_bgt"], "target_bgt": state["target_bgt"],
            "global_step": int(global_step)}
    save_tensors({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, ALLOCATOR_NAME),
                 metadata={"format": _ALLOCATOR_FORMAT, "state": json.dumps(meta)})


def load_allocator_state(tuner: AdaLoraModel, folder: str, global_step: Optional[int] = None) -> bool:
    """Restore the allocator saved in ``folder``; False when the folder has none. With
    ``global_step``, the saved state must be the one written at that step."""
    path = os.path.join(folder, ALLOCATOR_NAME)
    if not os.path.isfile(path):
        return False
    from safetensors import safe_open

    with safe_open(path, framework="pt") as fh:
        meta = fh.metadata() or {}
        if meta.get("format") != _ALLOCATOR_FORMAT:
            raise ValueError(f"{path}: format {meta.get('format')!r}, expected {_ALLOCATOR_FORMAT!r}")
        state = json.loads(meta["state"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    if global_step is not None and state["global_step"] != global_step:
        raise ValueError(f"{path} was written at step {state['global_step']}, but training resumes at step {global_step}")
    state["exp_avg_ipt"] = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("exp_avg_ipt/")}
    state["exp_avg_unc"] = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("exp_avg_unc/")}
    tuner.load_allocator_state_dict(state)
    return True


# ----------------------------------------------------------------------------- AdaLoRA callback


class AdaLoraCallback(TrainerCallback):
    """Runs AdaLoRA's rank allocator inside ``transformers.Trainer`` and checkpoints its state.

    Args:
        set_total_step: make the schedule's ``total_step`` the Trainer's number of optimizer steps.
        adapter_only_checkpoints: with the plain ``Trainer``, write the adapter in PEFT's format into
            each checkpoint and keep only adapter tensors in the Trainer's weight file.
        resume_from: the checkpoint folder a resumed run starts from, when it is not
            ``<output_dir>/checkpoint-<step>`` (``AdapterTrainer`` sets it itself).
    """

    def __init__(self, set_total_step: bool = True, adapter_only_checkpoints: bool = True,
                 resume_from: Optional[str] = None) -> None:
        self.set_total_step = set_total_step
        self.adapter_only_checkpoints = adapter_only_checkpoints
        self.resume_from = resume_from
        self.trainer_saves_adapter = False  # set by AdapterTrainer, which writes the adapter itself
        self._tuner: Optional[AdaLoraModel] = None
        self._calls_at_start = 0
        self._step_at_start = 0

    def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if getattr(args, "remove_unused_columns", False) and model is not None and not _names_columns(model):
            # the Trainer keeps the dataset columns named in the model's forward signature; for a
            # PeftModel without task_type it is forward(*args, **kwargs), which names none
            warnings.warn(
                "AdaLoraCallback sets TrainingArguments.remove_unused_columns=False: the model's forward names no "
                "dataset column (a config without task_type). Give it a dataset with only the model's inputs, or "
                "use deltatune.integrations.transformers.AdapterTrainer."
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
        if optimizer_attached(tuner):
            warnings.warn("AdaLoraCallback drives the rank allocator: the optimizer hook from attach_optimizer() is removed")
            detach_optimizer(tuner)
        self._tuner = tuner
        self._calls_at_start = tuner.allocation_calls
        self._step_at_start = state.global_step
        if state.global_step > 0:
            self._restore(args, state.global_step, tuner, name)

    def _restore(self, args: Any, step: int, tuner: AdaLoraModel, name: str) -> None:
        folder = self.resume_from or os.path.join(args.output_dir, f"checkpoint-{step}")
        if load_allocator_state(tuner, folder, step):
            return
        # an older checkpoint: only the rank pattern (adapter_config.json) can be recovered
        path = os.path.join(folder, "adapter_config.json")
        pattern = None
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                pattern = json.load(fh).get("rank_pattern")
            if pattern:
                tuner.peft_config[name].rank_pattern = {f"{key}.{name}": flags for key, flags in pattern.items()}
        warnings.warn(
            f"AdaLoRA: training resumes at step {step} but {folder} has no {ALLOCATOR_NAME}: the importance scores "
            f"restart at zero{'; rank_pattern restored from ' + path if pattern else ''}"
        )

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._tuner is not None:
            self._tuner.update_and_allocate(state.global_step)

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None or not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):
            return
        if self._tuner is not None:
            save_allocator_state(self._tuner, folder, state.global_step)
        if not self.adapter_only_checkpoints or self.trainer_saves_adapter:
            return
        peft_model = unwrap_peft_model(model)
        peft_model.save_pretrained(folder)
        for filename in _WEIGHT_FILES:
            path = os.path.join(folder, filename)
            if os.path.isfile(path):
                live = {k: v.contiguous() for k, v in adapter_state(peft_model).items()}
                save_tensors(live, path, safe_serialization=filename.endswith(".safetensors"))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        tuner = self._tuner
        if tuner is None:
            return
        steps = state.global_step - self._step_at_start
        if steps > 0 and tuner.allocation_calls == self._calls_at_start:
            warnings.warn(
                f"AdaLoRA: the Trainer ran {steps} optimizer steps but the rank allocator never ran, so no rank was "
                "pruned. This transformers version may not emit on_optimizer_step; call "
                "deltatune.integrations.adalora.attach_optimizer(model, trainer.optimizer) before training instead."
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


def _names_columns(model: Any) -> bool:
    """Whether the model's ``forward`` names its inputs (the Trainer keeps only named columns)."""
    params = inspect.signature(model.forward).parameters.values()
    return any(p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)


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


# ----------------------------------------------------------------------------- Trainer


class AdapterTrainerMixin:
    """Makes a ``Trainer`` subclass treat a deltatune ``PeftModel`` as it treats PEFT's models:
    adapter-only PEFT-format checkpoints and ``save_model()``, resume and
    ``load_best_model_at_end`` into the live adapter, AdaLoRA's allocator driven and checkpointed.
    Put it first in the bases: ``class MyTrainer(AdapterTrainerMixin, SomeTrainer)``."""

    _deltatune_in_checkpoint = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        peft_model = self._peft_model()
        callbacks = [cb for cb in self.callback_handler.callbacks if isinstance(cb, AdaLoraCallback)]
        if not callbacks and _is_adalora(peft_model):
            callbacks = [AdaLoraCallback()]
            self.add_callback(callbacks[0])
        for cb in callbacks:
            cb.trainer_saves_adapter = True

    def _peft_model(self) -> PeftModel:
        return unwrap_peft_model(self.model)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        self._deltatune_in_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._deltatune_in_checkpoint = False

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        """The adapter in PEFT's format (+ the live tensors in checkpoints), tokenizer, arguments."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self._peft_model()
        model.save_pretrained(output_dir)
        if self._deltatune_in_checkpoint:
            live = {k: v.contiguous() for k, v in adapter_state(model).items()}
            save_tensors(live, os.path.join(output_dir, RESUME_NAME))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        folder = resume_from_checkpoint
        if not _is_adapter_folder(folder):  # e.g. written by a plain Trainer: its full state dict
            super()._load_from_checkpoint(folder, model)
        else:
            load_adapter_state(self._peft_model(), folder)
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, AdaLoraCallback):
                cb.resume_from = folder

    def _load_best_model(self) -> None:
        folder = self.state.best_model_checkpoint
        if not _is_adapter_folder(folder):
            super()._load_best_model()
            return
        model = self._peft_model()
        load_adapter_state(model, folder)
        if _is_adalora(model) and model.base_model.trainable_adapter_name is not None:
            # the rank pattern of that checkpoint, so save_model() prunes the ranks it kept
            load_allocator_state(model.base_model, folder)


class AdapterTrainer(AdapterTrainerMixin, Trainer):
    """``transformers.Trainer`` for deltatune models (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # labels, loss and columns are read from the model's forward: look at the base model's
        from transformers.utils import can_return_loss, find_labels

        base_cls = type(self._peft_model().get_base_model())
        if self.args.label_names is None:
            self.label_names = find_labels(base_cls)
        self.can_return_loss = can_return_loss(base_cls)

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            forward = self._peft_model().get_base_model().forward
            self._signature_columns = list(inspect.signature(forward).parameters)
            self._signature_columns += list({"label", "label_ids", *self.label_names})


def _is_adalora(model: PeftModel) -> bool:
    return isinstance(model.base_model, AdaLoraModel)


def _is_adapter_folder(folder: str) -> bool:
    """Written by AdapterTrainer (live tensors), or a PEFT folder; not a plain Trainer checkpoint,
    whose weight file the Trainer's own loader reads."""
    if os.path.isfile(os.path.join(folder, RESUME_NAME)):
        return True
    if any(os.path.isfile(os.path.join(folder, n)) for n in _WEIGHT_FILES):
        return False
    return any(os.path.isfile(os.path.join(folder, n)) for n in ("adapter_model.safetensors", "adapter_model.bin"))
