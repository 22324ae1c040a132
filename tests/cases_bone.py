"""Bone cases (with its BAT init) for the lifecycle table (tests/cases.py)."""

import deltatune as dt
from cases import Case

CASES = [
    Case("bone-lin0", lambda: dt.BoneConfig(r=2, target_modules=["lin0"])),
    Case("bone-both", lambda: dt.BoneConfig(r=3, target_modules=["lin0", "lin1"])),
    Case("bone-kaiming", lambda: dt.BoneConfig(r=4, target_modules=["lin0", "lin1"], init_weights=False), identity=False),
    Case("bone-r>in", lambda: dt.BoneConfig(r=16, target_modules=["lin0"])),
    Case("bone-mts", lambda: dt.BoneConfig(r=2, target_modules=["lin0"], modules_to_save=["lin1"])),
    Case("bone-bias", lambda: dt.BoneConfig(r=2, target_modules=["lin0"], bias="bone_only")),
    Case("bat-lin1", lambda: dt.BoneConfig(r=4, target_modules=["lin1"], init_weights="bat")),
    Case("bat-both", lambda: dt.BoneConfig(r=2, target_modules=["lin0", "lin1"], init_weights="bat")),
    Case("bone-gpt2", lambda: dt.BoneConfig(r=4, target_modules=["c_attn", "c_proj"]), model="gpt2"),
    Case("bat-gpt2", lambda: dt.BoneConfig(r=4, target_modules=["c_fc"], init_weights="bat"), model="gpt2"),
    Case("bone-llama-all-linear", lambda: dt.BoneConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"), model="llama"),
    Case("bat-llama", lambda: dt.BoneConfig(r=8, init_weights="bat", task_type="CAUSAL_LM"), model="llama"),
]
