"""TRL's ``SFTTrainer`` and ``DPOTrainer`` for deltatune models.

    from deltatune.integrations.trl import DPOTrainer, SFTTrainer
    trainer = SFTTrainer(model=dt.get_peft_model(base, config), args=SFTConfig(...), train_dataset=ds,
                         processing_class=tokenizer)

This module imports trl; ``import deltatune`` does not import it.

TRL recognises only PEFT's own ``PeftModel`` (``accelerate.utils.is_peft_model`` is an
``isinstance`` check). Given any other model it

* puts its fused LM head (``trl.trainer.utils.add_fused_lm_head``: log-probabilities without
  materialising the logits) on the model itself, whose ``base_model`` it takes for the transformer
  body; a deltatune ``PeftModel``'s ``base_model`` is the adapter model, which returns the causal LM
  output (``'CausalLMOutputWithPast' object has no attribute 'last_hidden_state'``);
* for DPO without ``ref_model``, loads a second full model from ``config._name_or_path`` as the
  reference, where PEFT's models get the policy with the adapter disabled;
* saves checkpoints as a full ``state_dict()``.

The two trainers here are TRL's own with :class:`~deltatune.integrations.transformers.AdapterTrainerMixin`
(adapter-only PEFT-format checkpoints, exact resume, ``load_best_model_at_end``, AdaLoRA's
allocator) and two changes made after TRL's ``__init__``, on our objects only (TRL's code is not
patched): the fused head moves from the wrapper to the transformers model inside it (the same
options TRL chose), and DPO's default reference is :class:`AdapterReference`, the policy with
its adapters disabled (no weights of its own, no second copy).
"""

from __future__ import annotations

import inspect
import types
from typing import Any

import torch.nn as nn
import trl
from trl.trainer.utils import add_fused_lm_head

from ..core.layer import AdapterLayer
from ..peft_model import PeftModel
from .transformers import AdapterTrainerMixin, unwrap_peft_model

__all__ = ["AdapterReference", "DPOTrainer", "SFTTrainer"]


class AdapterReference(nn.Module):
    """DPO's reference model: ``policy`` itself, run with its adapters disabled.

    It holds the policy by reference, not as a submodule: it has no parameters of its own, moving
    or freezing it touches nothing, and the policy's weights exist once."""

    def __init__(self, policy: PeftModel) -> None:
        super().__init__()
        self.__dict__["policy"] = policy  # not registered: no second set of parameters

    @property
    def config(self) -> Any:
        return self.policy.config

    @property
    def generation_config(self) -> Any:
        return self.policy.generation_config

    def get_output_embeddings(self) -> Any:
        return self.policy.get_output_embeddings()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.policy.disable_adapter():
            return self.policy(*args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        # TRL hashes the reference's state dict to name its precomputed log-probabilities cache
        return self.policy.state_dict(*args, **kwargs)


def _check_model(model: Any, kwargs: dict) -> PeftModel:
    if isinstance(model, str):
        raise TypeError(
            f"deltatune's TRL trainers need a deltatune PeftModel as `model`, got the name {model!r}: load the base "
            "model and wrap it with deltatune.get_peft_model(base, config) first"
        )
    peft_model = unwrap_peft_model(model)
    if kwargs.get("peft_config") is not None:
        raise ValueError(
            "`peft_config` makes TRL wrap the model with PEFT itself; the model is already a deltatune PeftModel. "
            "Leave `peft_config` out."
        )
    head = peft_model.get_output_embeddings()
    if isinstance(head, AdapterLayer):
        raise ValueError(
            f"an adapter on the LM head ({type(head).__name__} at get_output_embeddings()) is not supported: TRL "
            "computes log-probabilities from the head's weight directly, so the adapter would never train. "
            "Remove the head (e.g. 'lm_head') from target_modules."
        )
    return peft_model


def _move_fused_head(peft_model: PeftModel) -> None:
    """Put TRL's fused LM head on the transformers model inside the wrapper, with TRL's options.

    TRL bound it to the wrapper's instance (``model.forward = MethodType(...)``); removing that
    attribute restores the wrapper's own forward, which passes ``fused_lm_head=True`` through to the
    inner model, whose ``base_model`` is the transformer body."""
    patched = vars(peft_model).pop("forward", None)
    if not isinstance(patched, types.MethodType):
        return  # this TRL version left the forward alone
    chosen = inspect.getclosurevars(patched.__func__).nonlocals
    options = {name: chosen[name] for name in inspect.signature(add_fused_lm_head).parameters
               if name != "model" and name in chosen}
    add_fused_lm_head(peft_model.get_base_model(), **options)


class SFTTrainer(AdapterTrainerMixin, trl.SFTTrainer):
    """``trl.SFTTrainer`` for a deltatune ``PeftModel`` (module docstring)."""

    def __init__(self, model: Any, *args: Any, **kwargs: Any) -> None:
        peft_model = _check_model(model, kwargs)
        super().__init__(model, *args, **kwargs)
        _move_fused_head(peft_model)


class DPOTrainer(AdapterTrainerMixin, trl.DPOTrainer):
    """``trl.DPOTrainer`` for a deltatune ``PeftModel``; without ``ref_model`` the reference is the
    policy with its adapters disabled (:class:`AdapterReference`), as for PEFT's models."""

    def __init__(self, model: Any, ref_model: Any = None, *args: Any, **kwargs: Any) -> None:
        peft_model = _check_model(model, kwargs)
        if ref_model is None:
            ref_model = AdapterReference(peft_model)
        super().__init__(model, ref_model, *args, **kwargs)
        _move_fused_head(peft_model)
        reference = self.ref_model
        if isinstance(reference, AdapterReference):
            vars(reference).pop("forward", None)  # its own forward reaches the policy's fused head
