"""MiSS cases (PEFT >= 0.19's name for Bone, with its mini variant) for the lifecycle table (tests/cases.py)."""

import deltatune as dt
from cases import Case

CASES = [
    Case("miss-mini-lin0", lambda: dt.MissConfig(r=2, init_weights="mini", mini_r=4, target_modules=["lin0"])),
    Case("miss-dropout", lambda: dt.MissConfig(r=2, miss_dropout=0.1, target_modules=["lin0", "lin1"])),
    Case("miss-gpt2", lambda: dt.MissConfig(r=4, target_modules=["c_attn", "c_proj"]), model="gpt2"),
    Case("miss-llama-mini", lambda: dt.MissConfig(r=4, init_weights="mini", mini_r=8, task_type="CAUSAL_LM", target_modules="all-linear"), model="llama"),
]
