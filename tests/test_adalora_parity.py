"""AdaLoRA against the real PEFT 0.21.2, in process: same initial weights from one seed, the same
rank patterns and outputs over a full schedule, and checkpoints crossing in both directions."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import deltatune as dt
from deltatune.integrations.adalora import attach_optimizer
from models import ConvNet, MLP, mlp_input, tiny_gpt2, tiny_llama, token_input

import peft  # noqa: E402  (a pinned test dependency: imported, never skipped)

SCHEDULE = dict(init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=12, lora_alpha=8)
ATOL = 1e-5


def _pair(make_base, seed=1, **config):
    """The same base model adapted by PEFT and by deltatune, each right after ``manual_seed(seed)``."""
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(make_base(), peft.AdaLoraConfig(**config))
    torch.manual_seed(seed)
    ours = dt.get_peft_model(make_base(), dt.AdaLoraConfig(**config))
    return theirs, ours


def _adapter_state(model, ours):
    if ours:
        return {k.replace(".adapters.default", ""): v for k, v in model.state_dict().items() if ".adapters." in k}
    return {k.replace(".default", ""): v for k, v in model.state_dict().items()
            if "lora_" in k and ".ranknum." not in k}


def _seeded(build):
    def make():
        torch.manual_seed(0)
        return build().eval()
    return make


def _logits(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out


CASES = {
    "linear": (_seeded(MLP), lambda: {"x": mlp_input()}, dict(target_modules=["lin0", "lin1"])),
    "conv1d": (_seeded(tiny_gpt2), lambda: {"input_ids": token_input()}, dict(target_modules=["c_attn", "c_fc"])),
    "conv2d": (_seeded(ConvNet), lambda: {"x": torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))},
               dict(target_modules=["conv2d", "lin0"])),
}


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("init", [True, False])
def test_one_seed_gives_peft_weights_outputs_and_merges(kind, init):
    make_base, make_inputs, targets = CASES[kind]
    theirs, ours = _pair(make_base, init_r=3, target_r=1, total_step=5, init_lora_weights=init, lora_alpha=5, **targets)
    mine, peft_state = _adapter_state(ours, True), _adapter_state(theirs, False)
    assert mine.keys() == peft_state.keys() and all(torch.equal(mine[k], peft_state[k]) for k in mine)
    if init:  # E = 0: give the adapters values so that the maths is exercised
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for key in sorted(mine):
                value = torch.randn(mine[key].shape, generator=g) * 0.3
                mine[key].copy_(value)
                peft_state[key].copy_(value)
    inputs = make_inputs()
    expected = _logits(theirs, inputs)
    assert (_logits(ours, inputs) - expected).abs().max() <= ATOL
    merged_ours, merged_theirs = ours.merge_and_unload(), theirs.merge_and_unload()
    # same formula in PEFT's rounding order: the merged weights are equal, not merely close
    ours_state, theirs_state = merged_ours.state_dict(), merged_theirs.state_dict()
    assert ours_state.keys() == theirs_state.keys() and all(torch.equal(v, theirs_state[k]) for k, v in ours_state.items())
    assert torch.equal(_logits(merged_ours, inputs), _logits(merged_theirs, inputs))


def _batches(n=4, seed=123):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (2, 8), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def trained_pair():
    """Both libraries after a full AdaLoRA schedule on the same batches (PEFT's documented loop;
    deltatune's allocator driven by the optimizer hook)."""
    torch.set_num_threads(1)
    theirs, ours = _pair(_seeded(tiny_llama), task_type="CAUSAL_LM", **SCHEDULE)
    theirs.train()
    ours.train()
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    attach_optimizer(ours, opt_ours)
    history = []
    batches = _batches()
    for step in range(SCHEDULE["total_step"] + 2):
        ids = batches[step % len(batches)]
        loss_theirs = theirs(input_ids=ids, labels=ids).loss  # includes PEFT's orthogonal term
        loss_theirs.backward()
        opt_theirs.step()
        theirs.base_model.update_and_allocate(step)
        opt_theirs.zero_grad()

        loss_ours = ours(input_ids=ids, labels=ids).loss
        loss_ours.backward()
        opt_ours.step()  # the hook runs update_and_allocate(step)
        opt_ours.zero_grad()
        history.append((
            step, loss_theirs.item(), loss_ours.item(),
            copy.deepcopy(theirs.peft_config["default"].rank_pattern),
            copy.deepcopy(ours.peft_config["default"].rank_pattern),
        ))
    theirs.eval()
    ours.eval()
    return theirs, ours, history


def test_full_schedule_reaches_peft_rank_pattern_and_outputs(trained_pair):
    theirs, ours, history = trained_pair
    for step, loss_theirs, loss_ours, pattern_theirs, pattern_ours in history:
        assert abs(loss_theirs - loss_ours) <= ATOL, step
        assert pattern_ours == pattern_theirs, step
    final = history[-1][4]
    assert final is not None and sum(map(sum, final.values())) == 2 * 4  # target_r x 4 modules
    # the first allocation is at step 4 (tinit=2, deltaT=2), to a budget of 10 of 16 ranks
    assert all(h[4] is None for h in history[:4])
    assert sum(map(sum, history[4][4].values())) == 10
    ids = token_input()
    assert (_logits(ours, {"input_ids": ids}) - _logits(theirs, {"input_ids": ids})).abs().max() <= ATOL
    for key, value in _adapter_state(theirs, False).items():
        assert (value - _adapter_state(ours, True)[key]).abs().max() <= ATOL, key


def test_our_pruned_checkpoint_loads_in_peft(trained_pair, tmp_path):
    _, ours, _ = trained_pair
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert all(k.endswith(".lora_E") for k in config["rank_pattern"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(_seeded(tiny_llama)(), tmp_path)
    assert not [w for w in caught if "Unexpected keyword" in str(w.message) or "missing" in str(w.message).lower()]
    assert isinstance(loaded.peft_config["default"], peft.AdaLoraConfig)
    q = loaded.base_model.model.model.layers[0].self_attn.q_proj
    kept = sum(config["rank_pattern"]["model.layers.0.self_attn.q_proj.lora_E"])
    assert q.lora_A["default"].shape == (kept, 16) and q.ranknum["default"].item() == SCHEDULE["init_r"]
    ids = {"input_ids": token_input()}
    assert (_logits(loaded, ids) - _logits(ours, ids)).abs().max() <= ATOL


def test_peft_pruned_checkpoint_loads_here(trained_pair, tmp_path):
    theirs, ours, _ = trained_pair
    theirs.save_pretrained(tmp_path)
    assert len(json.loads((tmp_path / "adapter_config.json").read_text())) >= 50  # PEFT writes every LoRA field
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT's defaults for fields AdaLoRA does not use load silently
        loaded = dt.PeftModel.from_pretrained(_seeded(tiny_llama)(), tmp_path)
    ids = {"input_ids": token_input()}
    assert (_logits(loaded, ids) - _logits(theirs, ids)).abs().max() <= ATOL
    ours_state = dt.get_peft_model_state_dict(ours.base_model)
    loaded_state = dt.get_peft_model_state_dict(loaded.base_model)
    assert {k: v.shape for k, v in ours_state.items()} == {k: v.shape for k, v in loaded_state.items()}
    # a trainable reload keeps PEFT's scale (ranknum = init_r) and trains on
    again = dt.PeftModel.from_pretrained(_seeded(tiny_llama)(), tmp_path, is_trainable=True)
    assert again.base_model.trainable_adapter_name == "default"
    assert all(d.ranknum.item() == SCHEDULE["init_r"] for d in again.base_model.deltas("default").values())
    assert (_logits(again, ids) - _logits(theirs, ids)).abs().max() <= ATOL
