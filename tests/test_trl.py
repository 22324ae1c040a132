"""TRL's SFTTrainer and DPOTrainer with deltatune models (deltatune.integrations.trl), one
representative case per method on a tied-embedding tiny Llama, tiny in-memory datasets."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import deltatune as dt
from models import token_input
from test_trainer import IDS, LLAMA_CASES, _cheap_gc, assert_same, live, make_model, tied_llama  # noqa: F401

import trl  # noqa: E402  (a pinned test dependency: imported, never skipped)
from datasets import Dataset  # noqa: E402

from deltatune.integrations.transformers import RESUME_NAME  # noqa: E402
from deltatune.integrations.trl import AdapterReference, DPOTrainer, SFTTrainer  # noqa: E402


def tokenizer():
    """A word-level tokenizer over the tiny Llama's 64 ids (built in memory: nothing is downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(61)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


SFT_DATA = [{"text": " ".join(f"w{(i * 7 + j) % 61}" for j in range(6))} for i in range(8)]
DPO_DATA = [{"prompt": f"w{i} w{i + 1}", "chosen": f" w{i + 2} w{i + 3}", "rejected": f" w{i + 9} w{i + 5}"}
            for i in range(8)]
COMMON = dict(max_steps=2, per_device_train_batch_size=4, save_steps=2, report_to=[], use_cpu=True, logging_steps=1,
              disable_tqdm=True, seed=0)


def _check_adapter_folder(folder, model) -> None:
    files = set(os.listdir(folder))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}
    model.eval()
    ids = token_input()
    reloaded = dt.PeftModel.from_pretrained(tied_llama(), folder)
    # model.base_model: the trainer wrapped the wrapper's forward in its (bf16) autocast
    torch.testing.assert_close(reloaded(input_ids=ids).logits, model.base_model(input_ids=ids).logits,
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", LLAMA_CASES, ids=IDS)
def test_sft_trains_every_method_with_adapter_only_checkpoints(case, tmp_path):
    model = make_model(case)
    before = live(model)
    args = trl.SFTConfig(output_dir=str(tmp_path), learning_rate=1e-2, max_length=16, **COMMON)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(SFT_DATA),
                             processing_class=tokenizer())
        trainer.train()
    # TRL's fused head sits on the transformers model inside the wrapper and answers through it
    ids = token_input()
    with torch.no_grad():
        fused = model(input_ids=ids, labels=ids, fused_lm_head=True)
        plain = model(input_ids=ids, labels=ids)
    assert fused.log_probs.shape == (2, 6) and plain.logits.shape == (2, 7, 64)
    torch.testing.assert_close(fused.loss, plain.loss, atol=1e-5, rtol=1e-5)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(0 < x < 10 for x in losses)
    assert any(not torch.equal(before[k], v) for k, v in live(model).items())
    assert RESUME_NAME in os.listdir(tmp_path / "checkpoint-2")
    trainer.save_model(str(tmp_path / "final"))
    _check_adapter_folder(tmp_path / "final", model)


@pytest.mark.parametrize("case", LLAMA_CASES, ids=IDS)
def test_dpo_reference_is_the_policy_with_adapters_disabled(case, tmp_path):
    model = make_model(case)
    base = tied_llama()  # the same weights, without adapters: what the reference must compute
    before = live(model)
    args = trl.DPOConfig(output_dir=str(tmp_path), learning_rate=1e-2, bf16=False, **COMMON)  # fp32: exact checks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(DPO_DATA),
                             processing_class=tokenizer())
        reference = trainer.ref_model
        assert isinstance(reference, AdapterReference) and reference.policy is model
        assert not list(reference.parameters())  # no second copy of the weights
        trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in live(model).items())
    rewards = [h["rewards/margins"] for h in trainer.state.log_history if "rewards/margins" in h]
    assert len(rewards) == 2

    # after training, the reference still gives the base model's log-probabilities
    ids = token_input(batch=2, length=6)
    labels = ids.clone()
    model.eval()
    with torch.no_grad():
        ref = reference(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
        logits = base(input_ids=ids).logits[:, :-1].float()
        expected = torch.log_softmax(logits, -1).gather(-1, labels[:, 1:, None]).squeeze(-1)
        policy = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
    torch.testing.assert_close(ref, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(policy, expected, atol=1e-6)
    _check_adapter_folder(tmp_path / "checkpoint-2", model)


def test_trl_trainers_refuse_what_would_silently_go_wrong(tmp_path):
    args = trl.SFTConfig(output_dir=str(tmp_path), **COMMON)
    data = Dataset.from_list(SFT_DATA)
    with pytest.raises(TypeError, match="deltatune PeftModel"):
        SFTTrainer(model="HuggingFaceTB/SmolLM2-135M", args=args, train_dataset=data, processing_class=tokenizer())
    head = dt.get_peft_model(tied_llama(), dt.BoneConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="adapter on the LM head"):
        SFTTrainer(model=head, args=args, train_dataset=data, processing_class=tokenizer())
