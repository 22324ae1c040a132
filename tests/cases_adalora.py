"""AdaLoRA cases for the shared lifecycle table (tests/cases.py).

AdaLoRA trains one adapter at a time: PEFT refuses a second adapter whose config has
``inference_mode=False``. ``extra["second_adapter"]`` holds the fields a lifecycle test must set on
the config of an added second adapter.
"""

from __future__ import annotations

import deltatune as dt
from cases import Case

SECOND = {"second_adapter": {"inference_mode": True}}


def _ada(**kw):
    return lambda: dt.AdaLoraConfig(total_step=10, **{"init_r": 4, "target_r": 2, **kw})


CASES: list[Case] = [
    Case("adalora-lin0", _ada(target_modules=["lin0"]), extra=SECOND),
    Case("adalora-both-randn", _ada(target_modules=["lin0", "lin1"], init_lora_weights=False, lora_alpha=2),
         identity=False, extra=SECOND),
    Case("adalora-mts-dropout", _ada(target_modules=["lin0"], modules_to_save=["lin1"], lora_dropout=0.1), extra=SECOND),
    Case("adalora-bias", _ada(target_modules=["lin1"], bias="lora_only"), extra=SECOND),
    Case("adalora-conv2d", _ada(target_modules=["conv2d", "lin0"]), model="conv", extra=SECOND),
    Case("adalora-gpt2", _ada(target_modules=["c_attn", "c_proj"], task_type="CAUSAL_LM"), model="gpt2", extra=SECOND),
    # q_proj gets ~1e-7 gradients in this tiny random Llama: too little to see it train
    Case("adalora-llama", _ada(target_modules=["v_proj", "o_proj", "down_proj"], task_type="CAUSAL_LM"), model="llama",
         extra=SECOND),
]
