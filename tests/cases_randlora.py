"""RandLoRA cases for the lifecycle table (tests/cases.py)."""

import deltatune as dt
from cases import Case

CASES = [
    Case("randlora-lin0", lambda: dt.RandLoraConfig(r=4, randlora_alpha=8, target_modules=["lin0"])),
    Case("randlora-both-noinit", lambda: dt.RandLoraConfig(r=4, randlora_alpha=80, target_modules=["lin0", "lin1"], init_weights=False), identity=False),
    Case("randlora-sparse-mts", lambda: dt.RandLoraConfig(r=3, randlora_alpha=6, target_modules=["lin0"], sparse=True, modules_to_save=["lin1"])),
    Case("randlora-very-sparse", lambda: dt.RandLoraConfig(r=2, randlora_alpha=4, target_modules=["lin1"], very_sparse=True)),
    Case("randlora-gpt2", lambda: dt.RandLoraConfig(r=4, randlora_alpha=8, target_modules=["c_attn", "c_proj"]), model="gpt2"),
    Case("randlora-llama", lambda: dt.RandLoraConfig(r=8, randlora_alpha=16, task_type="CAUSAL_LM", target_modules="all-linear"), model="llama"),
]
