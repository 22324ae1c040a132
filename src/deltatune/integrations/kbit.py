"""Preparing a quantized (k-bit) model for adapter training, as PEFT users do before ``get_peft_model``.

``prepare_model_for_kbit_training`` keeps PEFT's name, signature and steps: freeze every base
parameter; for bitsandbytes models, upcast the remaining half-precision tensors (norms, embeddings,
biases) to fp32, which keeps their small updates of the activations from rounding away; and turn
on gradient checkpointing with inputs that require grad, so reentrant checkpointing still has a
tensor to differentiate when everything before the first adapter is frozen. torchao models keep
their dtypes (their weights are tensor subclasses; PEFT skips the upcast for them too).
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
import torch.nn as nn

from ..core.precision import quant_scheme

_HALF = (torch.float16, torch.bfloat16)


def _schemes(model: nn.Module) -> set[str]:
    return {s.name for m in model.modules() if (s := quant_scheme(m)) is not None}


def prepare_model_for_kbit_training(
    model: nn.Module, use_gradient_checkpointing: bool = True, gradient_checkpointing_kwargs: Optional[dict[str, Any]] = None
) -> nn.Module:
    """Get a 4/8-bit model ready for adapter training (in place; returns ``model``)."""
    schemes = _schemes(model)
    quantized = bool(schemes) or getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
    for param in model.parameters():
        param.requires_grad_(False)
    if not any(name.startswith("torchao") for name in schemes):
        for param in model.parameters():
            if param.dtype in _HALF:
                param.data = param.data.float()
    if quantized and use_gradient_checkpointing:
        kwargs = dict(gradient_checkpointing_kwargs or {})
        # non-reentrant checkpointing differentiates through frozen inputs by itself
        if kwargs.get("use_reentrant", True):
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            else:
                embeddings = model.get_input_embeddings()
                embeddings.register_forward_hook(lambda module, args, out: out.requires_grad_(True))
        enable = getattr(model, "gradient_checkpointing_enable", None)
        if enable is None:
            raise ValueError(
                f"{type(model).__name__} has no gradient_checkpointing_enable(); pass use_gradient_checkpointing=False "
                "or enable checkpointing yourself"
            )
        if "gradient_checkpointing_kwargs" in inspect.signature(enable).parameters:
            enable(gradient_checkpointing_kwargs=kwargs)
        else:
            enable()
    return model
