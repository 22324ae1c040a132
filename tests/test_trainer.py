"""transformers' Trainer with deltatune models: the plain Trainer (tied embeddings, exact resume)
and deltatune's AdapterTrainer (adapter-only PEFT checkpoints, resume, load_best_model_at_end,
AdaLoRA's allocator state), over one representative case per method on a tied-embedding Llama."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from cases import CASES
from dist_worker import representative
from models import token_input

import transformers  # noqa: E402  (a pinned test dependency: imported, never skipped)
from deltatune.integrations.transformers import (  # noqa: E402
    ALLOCATOR_NAME, RESUME_NAME, AdaLoraCallback, AdapterTrainer, adapter_state,
)

LLAMA_CASES = representative(CASES, kinds=("llama",))
IDS = [c.id for c in LLAMA_CASES]


def tied_llama(seed: int = 0):
    """The tests' tiny Llama with the input embedding and LM head tied (SmolLM2, Qwen2.5, Gemma)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None)
    model = LlamaForCausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def lm_rows(n: int = 16, length: int = 8, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(2, 64, (length,), generator=g)
        rows.append({"input_ids": ids, "labels": ids})
    return rows


def make_model(case):
    torch.manual_seed(0)
    return dt.get_peft_model(tied_llama(), case.config())


def training_args(out, **kw):
    base = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                learning_rate=1e-2, save_steps=2, logging_steps=100, report_to=[], use_cpu=True, disable_tqdm=True,
                seed=0, save_only_model=False, lr_scheduler_type="linear")
    base.update(kw)
    return transformers.TrainingArguments(**base)


def live(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in adapter_state(model).items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def callbacks_for(case):
    return [AdaLoraCallback()] if case.id.startswith("adalora") else []


@pytest.fixture(autouse=True, scope="module")
def _cheap_gc():
    # accelerate runs gc.collect() at each train(); in a test process holding many objects that is
    # most of a tiny run's time. Frozen objects are skipped by the collector (nothing else changes).
    import gc

    gc.freeze()
    yield
    gc.unfreeze()


def quiet():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("ignore")
    return ctx


class FirstEvalIsBest:
    """compute_metrics whose first evaluation scores best: load_best_model_at_end must go back to checkpoint-2."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, _pred) -> dict:
        self.calls += 1
        return {"score": 1.0 if self.calls == 1 else 0.0}


@pytest.mark.parametrize("case", LLAMA_CASES, ids=IDS)
def test_plain_and_adapter_trainer_checkpoints_resume_and_best_model(case, tmp_path):
    rows = lm_rows()
    ids = token_input()
    ctx = quiet()
    try:
        # plain Trainer: save_steps used to fail on tied embeddings ("Some tensors share memory")
        model = make_model(case)
        initial = live(model)
        transformers.Trainer(model=model, args=training_args(tmp_path / "plain"), train_dataset=rows,
                             callbacks=callbacks_for(case)).train()
        uninterrupted = live(model)
        assert any(not torch.equal(v, initial[k]) for k, v in uninterrupted.items())
        saved = load_file(tmp_path / "plain" / "checkpoint-2" / "model.safetensors")
        if case.id.startswith("adalora"):  # AdaLoraCallback keeps the adapter only
            assert saved and all(".adapters." in k for k in saved)
        else:  # the plain Trainer's full state dict, the tied weight once
            assert "base_model.model.model.embed_tokens.weight" in saved
            assert "base_model.model.lm_head.weight" not in saved

        resumed = make_model(case)
        transformers.Trainer(model=resumed, args=training_args(tmp_path / "plain"), train_dataset=rows,
                             callbacks=callbacks_for(case)).train(resume_from_checkpoint=str(tmp_path / "plain" / "checkpoint-2"))
        assert_same(live(resumed), uninterrupted)

        # AdapterTrainer, evaluating every 2 steps: the same training, adapter-only checkpoints, and
        # load_best_model_at_end going back to checkpoint-2
        best_model = make_model(case)
        args = training_args(tmp_path / "ours", eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                             metric_for_best_model="score", greater_is_better=True, per_device_eval_batch_size=8)
        trainer = AdapterTrainer(model=best_model, args=args, train_dataset=rows, eval_dataset=rows[:4],
                                 compute_metrics=FirstEvalIsBest())
        trainer.train()
        last = tmp_path / "ours" / "checkpoint-4"
        files = set(os.listdir(last))
        assert {"adapter_config.json", "adapter_model.safetensors", RESUME_NAME} <= files
        assert not files & {"model.safetensors", "pytorch_model.bin"}  # no base weights
        assert (ALLOCATOR_NAME in files) == case.id.startswith("adalora")
        assert_same(load_file(last / RESUME_NAME), uninterrupted)
        assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
        best = load_file(tmp_path / "ours" / "checkpoint-2" / RESUME_NAME)
        assert_same(live(best_model), best)
        assert not all(torch.equal(best[k], v) for k, v in uninterrupted.items())
        trainer.save_model(str(tmp_path / "final"))

        # resuming AdapterTrainer's checkpoint reproduces the uninterrupted run
        resumed = make_model(case)
        AdapterTrainer(model=resumed, args=training_args(tmp_path / "again"), train_dataset=rows).train(
            resume_from_checkpoint=str(tmp_path / "ours" / "checkpoint-2"))
        assert_same(live(resumed), uninterrupted)
    finally:
        ctx.__exit__(None, None, None)

    # checkpoints and save_model() are PEFT-format adapters of the model at that point
    resumed.eval()
    reloaded = dt.PeftModel.from_pretrained(tied_llama(), last)
    torch.testing.assert_close(reloaded(input_ids=ids).logits, resumed(input_ids=ids).logits, atol=1e-6, rtol=1e-6)
    final_files = set(os.listdir(tmp_path / "final"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= final_files
    assert not final_files & {"model.safetensors", RESUME_NAME}
    best_model.eval()
    reloaded = dt.PeftModel.from_pretrained(tied_llama(), tmp_path / "final")
    torch.testing.assert_close(reloaded(input_ids=ids).logits, best_model(input_ids=ids).logits, atol=1e-6, rtol=1e-6)


def test_adapter_trainer_keeps_columns_for_a_config_without_task_type(tmp_path):
    from datasets import Dataset

    rows = [{"input_ids": r["input_ids"].tolist(), "labels": r["labels"].tolist(), "source": "x"} for r in lm_rows(8)]
    model = dt.get_peft_model(tied_llama(), dt.BoneConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert type(model) is dt.PeftModel
    args = training_args(tmp_path, max_steps=2, save_steps=100, gradient_accumulation_steps=1)
    with pytest.raises(ValueError, match="No columns in the dataset match"):
        transformers.Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows)).train()
    trainer = AdapterTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows))
    assert trainer.label_names == ["labels"]
    before = live(model)
    trainer.train()  # "source" is dropped, input_ids and labels are kept
    assert any(not torch.equal(before[k], v) for k, v in live(model).items())


# ----------------------------------------------------------------------------- AdaLoRA resume


def _adalora(tmp, save: bool = False):
    torch.manual_seed(0)
    config = dt.AdaLoraConfig(task_type="CAUSAL_LM", init_r=4, target_r=2, tinit=1, tfinal=3, deltaT=1, total_step=8,
                              target_modules=["v_proj", "o_proj", "down_proj"], orth_reg_weight=0.1)
    model = dt.get_peft_model(tied_llama(), config)
    args = training_args(tmp, max_steps=8, save_steps=1, gradient_accumulation_steps=1,
                         save_strategy="steps" if save else "no")
    return model, AdapterTrainer(model=model, args=args, train_dataset=lm_rows())


def test_adalora_resume_equals_uninterrupted_before_inside_and_at_the_end_of_budgeting(tmp_path):
    # total_step 8, tinit 1, tfinal 3: steps 2-4 prune towards the budget, step 5 (= total_step - tfinal)
    # prunes to the target and needs the importance scores, steps 6-7 re-apply the final pattern
    ctx = quiet()
    try:
        model, trainer = _adalora(tmp_path / "full", save=True)
        trainer.train()
        expected, pattern = live(model), model.peft_config["default"].rank_pattern
        assert pattern is not None
        for step in (1, 3, 5):
            resumed, trainer = _adalora(tmp_path / f"from-{step}")
            trainer.train(resume_from_checkpoint=str(tmp_path / "full" / f"checkpoint-{step}"))
            assert resumed.peft_config["default"].rank_pattern == pattern, step
            assert_same(live(resumed), expected)
    finally:
        ctx.__exit__(None, None, None)
    # what the allocator saves at step 3: the importance EMAs of every A, E, B and the pattern so far
    saved = load_file(tmp_path / "full" / "checkpoint-3" / ALLOCATOR_NAME)
    assert len(saved) == 2 * 3 * 3 * 2  # (ipt, unc) x (A, E, B) x 3 modules x 2 layers

    # a checkpoint without the allocator state (an older one) resumes with a warning
    os.remove(tmp_path / "full" / "checkpoint-3" / ALLOCATOR_NAME)
    resumed, trainer = _adalora(tmp_path / "old")
    with pytest.warns(UserWarning, match="importance scores restart at zero"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
