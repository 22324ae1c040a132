"""transformers' ``Trainer`` with a deltatune model: adapter-only checkpoints that PEFT can load.

    python examples/trainer_adapter_only.py                      # MiniLM + Rotten Tomatoes, Bone r=64
    python examples/trainer_adapter_only.py --method adalora     # AdaLoRA, with AdaLoraCallback
    python examples/trainer_adapter_only.py --model DIR --data train.csv --max-steps 50

``AdapterTrainer`` (deltatune.integrations.transformers, see docs/trainer.md) makes transformers'
``Trainer`` treat a deltatune model as it treats PEFT's: checkpoints and ``save_model()`` are
adapter-only PEFT-format folders, resume and ``load_best_model_at_end`` load the adapter back, and
for AdaLoRA it adds ``AdaLoraCallback`` (rank allocation tied to the optimizer steps, allocator
state in each checkpoint).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import DataCollatorWithPadding, TrainingArguments

import deltatune as dt
from deltatune.cli import data as cli_data
from deltatune.cli import models as cli_models
from deltatune.cli.options import build_config, learning_rates, resolve_method
from deltatune.cli.backends import param_groups
from deltatune.integrations.transformers import AdapterTrainer


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
        data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy,
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
