"""FourierFT cases for the lifecycle table (tests/cases.py)."""

import deltatune as dt
from cases import Case

CASES = [
    Case("fourierft-lin0", lambda: dt.FourierFTConfig(n_frequency=10, init_weights=True, target_modules=["lin0"])),
    Case("fourierft-both-pattern", lambda: dt.FourierFTConfig(n_frequency=15, target_modules=["lin0", "lin1"], n_frequency_pattern={"lin1": 7}), identity=False),
    Case("fourierft-mts", lambda: dt.FourierFTConfig(n_frequency=10, init_weights=True, target_modules=["lin0"], modules_to_save=["lin1"])),
    Case("fourierft-gpt2", lambda: dt.FourierFTConfig(n_frequency=20, init_weights=True, target_modules=["c_attn", "c_proj"]), model="gpt2"),
    Case("fourierft-llama", lambda: dt.FourierFTConfig(n_frequency=30, scaling=10.0, task_type="CAUSAL_LM", target_modules="all-linear"), model="llama", identity=False),
]
