"""transformers' ``Trainer`` with a deltatune model: adapter-only checkpoints that PEFT can load.

    python examples/trainer_adapter_only.py                      # MiniLM + Rotten Tomatoes, Bone r=64
    python examples/trainer_adapter_only.py --method adalora     # AdaLoRA, with AdaLoraCallback
    python examples/trainer_adapter_only.py --model DIR --data train.csv --max-steps 50

Why the small ``Trainer`` subclass (see docs/trainer.md): transformers 5.23 recognises only
``peft.PeftModel`` as an adapter model. Given a deltatune ``PeftModel`` it would

* save every checkpoint as the *full* state dict (``model.safetensors``, base weights included)
  instead of the adapter (``Trainer._save``),
* drop ``input_ids``/``attention_mask`` from the batches, because it reads the accepted columns
  from ``model.forward``'s signature, which for a wrapper is ``(*args, **kwargs)``
  (``remove_unused_columns=True``, the default),
* find no label column (it looks for ``labels`` in that same signature), so evaluation reports no
  loss and no metrics,
* not know how to restore the adapter when resuming from a checkpoint.

``AdapterTrainer`` below fixes all four: ``_save`` calls ``PeftModel.save_pretrained`` (adapter
files only, PEFT's format, plus the live adapter tensors in ``adapter_resume.safetensors``), the columns and labels come from the base model's ``forward``, and resuming loads
the adapter weights back into the live model. AdaLoRA additionally needs its rank allocation tied
to the optimizer's steps: ``deltatune.integrations.transformers.AdaLoraCallback`` does that.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

import deltatune as dt
from deltatune.cli import data as cli_data
from deltatune.cli import models as cli_models
from deltatune.cli.options import build_config, learning_rates, resolve_method
from deltatune.cli.train import param_groups
from deltatune.io.files import load_tensors, save_tensors
from deltatune.io.state_dict import set_peft_model_state_dict

TRAINING_ARGS_NAME = "training_args.bin"
RESUME_NAME = "adapter_resume.safetensors"  # the live adapter state, for the Trainer's own reloads


class AdapterTrainer(Trainer):
    """A ``Trainer`` that treats a deltatune ``PeftModel`` as PEFT's own models are treated."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # labels and loss are read from the class of the model's forward: look at the base model's
        from transformers.utils import can_return_loss, find_labels

        base_cls = self._peft_model().get_base_model().__class__
        if self.args.label_names is None:
            self.label_names = find_labels(base_cls)
        self.can_return_loss = can_return_loss(base_cls)

    def _peft_model(self) -> dt.PeftModel:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not isinstance(model, dt.PeftModel):
            raise TypeError(f"AdapterTrainer needs a deltatune PeftModel, got {type(model).__name__}")
        return model

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        """Adapter-only checkpoint: adapter_config.json + adapter_model.safetensors (+ tokenizer, args)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self._peft_model()
        model.save_pretrained(output_dir)
        # the live adapter tensors under their in-memory keys, for resuming and load_best_model_at_end:
        # PEFT's file may be reshaped (AdaLoRA prunes ranks when saving) and cannot always be loaded back
        save_tensors(_adapter_state(model), os.path.join(output_dir, RESUME_NAME))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _set_signature_columns_if_needed(self) -> None:
        # the wrapper's forward is (*args, **kwargs): read the accepted columns from the base model
        if self._signature_columns is None:
            forward = self._peft_model().get_base_model().forward
            self._signature_columns = list(inspect.signature(forward).parameters)
            self._signature_columns += list({"label", "label_ids", *self.label_names})

    def _load_adapter_weights(self, folder: str) -> None:
        model = self._peft_model()
        resume = os.path.join(folder, RESUME_NAME)
        if not os.path.isfile(resume):  # a plain PEFT-format folder
            set_peft_model_state_dict(model.base_model, load_tensors(folder), model.active_adapter)
            return
        from safetensors.torch import load_file

        state = load_file(resume)
        unexpected = model.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"{resume} does not match the model: unexpected keys {unexpected[:5]}")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        self._load_adapter_weights(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._load_adapter_weights(self.state.best_model_checkpoint)


def _adapter_state(model: dt.PeftModel) -> dict[str, torch.Tensor]:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items()
            if ".adapters." in k or ".modules_to_save." in k or k in trainable}


class ReviewDataset(torch.utils.data.Dataset):
    """Tokenized ``{"text", "label"}`` rows; padding is left to the collator."""

    def __init__(self, rows: list[dict], tokenizer: Any, max_length: int) -> None:
        self.encoded = tokenizer([r["text"] for r in rows], truncation=True, max_length=max_length)
        self.labels = [r["label"] for r in rows]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.encoded["input_ids"][i], "attention_mask": self.encoded["attention_mask"][i],
                "labels": self.labels[i]}


def accuracy(eval_pred: Any) -> dict[str, float]:
    logits, labels = eval_pred
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="bone", help="bone, bat, fourierft, randlora, adalora (any registered)")
    parser.add_argument("--model", help="local sequence-classification model folder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--data", help="local CSV/JSONL with text,label columns (default: Rotten Tomatoes)")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--save-steps", type=int, default=100)
    parser.add_argument("--eval-limit", type=int, default=500, help="test examples to evaluate on")
    parser.add_argument("--output", default="runs/trainer-example")
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.data:
        train_rows, test_rows, labels = cli_data.load_local_dataset(args.data)
    else:
        train_rows, test_rows = cli_data.load_rotten_tomatoes()
        labels = list(cli_data.ROTTEN_TOMATOES_LABELS)
    torch.manual_seed(0)
    base, tokenizer = cli_models.load_classifier(args.model, len(labels), labels)

    # the CLI's per-method defaults (sizes, FourierFT scaling, RandLoRA alpha = 20·r, AdaLoRA schedule)
    spec = resolve_method(args.method)
    config = build_config(spec, {}, None, "SEQ_CLS", steps=args.max_steps)
    model = dt.get_peft_model(base, config)
    model.print_trainable_parameters()
    lr, head_lr = learning_rates(spec, None, None)

    callbacks = []
    if spec.peft_type == "ADALORA":
        # ties AdaLoRA's rank allocation to the Trainer's optimizer steps (total_step = max_steps)
        from deltatune.integrations.transformers import AdaLoraCallback

        callbacks.append(AdaLoraCallback())

    training_args = TrainingArguments(
        output_dir=args.output, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=128, learning_rate=lr, lr_scheduler_type="linear", warmup_steps=0.1,
        eval_strategy="steps", eval_steps=args.save_steps, save_strategy="steps", save_steps=args.save_steps,
        logging_steps=max(1, args.max_steps // 10), report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
        load_best_model_at_end=True, metric_for_best_model="accuracy", save_total_limit=2,
    )
    trainer = AdapterTrainer(
        model=model, args=training_args, processing_class=tokenizer,
        train_dataset=ReviewDataset(train_rows, tokenizer, 64),
        eval_dataset=ReviewDataset(test_rows[: args.eval_limit], tokenizer, 64),
        data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy, callbacks=callbacks,
        # the new head learns at its own rate, as in `deltatune train`; the Trainer adds the schedule
        optimizers=(torch.optim.AdamW(param_groups(model, lr, head_lr, 0.0), lr=lr), None),
    )
    trainer.train(resume_from_checkpoint=args.resume or None)
    metrics = trainer.evaluate()
    trainer.save_model(args.output)  # the final (best) adapter, PEFT's format
    print(f"accuracy {100 * metrics['eval_accuracy']:.1f} %; adapter in {args.output}:",
          ", ".join(sorted(p.name for p in Path(args.output).iterdir() if p.is_file())))
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
