"""AdaLoRA's rank allocator and orthogonal regulariser against PEFT 0.21.2, through the model's own
API (``update_and_allocate``, ``allocation.rank_allocator()``, ``allocator_state_dict``): the budget schedule,
the importance EMAs and triplet scores, the masks (ties and dtypes included), rank-0 modules, exact
pattern keys, resuming and determinism."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

import peft  # noqa: E402  (pinned test dependencies: imported, never skipped)

import deltatune as dt
from deltatune.methods._adalora_alloc import orthogonal_regularization
from models import MLP, mlp_input, tiny_llama

ADAPTER = "default"
SCHEDULE = dict(init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=12)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- helpers


def _pair(make_base=tiny_llama, seed=1, autocast_adapter_dtype=True, **config):
    """The same base adapted by PEFT and by deltatune, each right after ``manual_seed(seed)`` (one
    seed gives both libraries the same initial adapter weights)."""
    config = {"init_lora_weights": False, **config}
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(make_base(), peft.AdaLoraConfig(**config), autocast_adapter_dtype=autocast_adapter_dtype)
    torch.manual_seed(seed)
    ours = dt.get_peft_model(make_base(), dt.AdaLoraConfig(**config), autocast_adapter_dtype=autocast_adapter_dtype)
    return theirs, ours


def _peft_triplets(peft_model) -> dict:
    return {name: (m.lora_A[ADAPTER], m.lora_E[ADAPTER], m.lora_B[ADAPTER])
            for name, m in peft_model.base_model.model.named_modules() if isinstance(m, peft.tuners.adalora.AdaLoraLayer)}


def _strip(pattern):
    return None if pattern is None else {k.removesuffix(f".{ADAPTER}"): [bool(v) for v in f] for k, f in pattern.items()}


def _trips(model) -> dict:
    return model.base_model.triplets() if isinstance(model, dt.PeftModel) else _peft_triplets(model)


def _set_grads(models, seed, tie=None):
    """The same random gradient on every A, E, B of every model (deltatune's or PEFT's); with
    ``tie``, module ``tie[1]`` gets the gradients of module ``tie[0]``."""
    g = torch.Generator().manual_seed(seed)
    grads = {(path, i): torch.randn(t.shape, generator=g) for path, trip in _trips(models[0]).items() for i, t in enumerate(trip)}
    if tie is not None:
        for i in range(3):
            grads[(tie[1], i)] = grads[(tie[0], i)].clone()
    for model in models:
        for path, trip in _trips(model).items():
            for i, t in enumerate(trip):
                t.grad = grads[(path, i)].to(t.dtype)


def _batches(n=4, seed=123):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (2, 8), generator=g) for _ in range(n)]


# ----------------------------------------------------------------------------- schedule


def test_budget_schedule_values():
    allocator = dt.get_peft_model(tiny_llama(), dt.AdaLoraConfig(**SCHEDULE)).base_model.allocation.rank_allocator()
    assert allocator.init_bgt == 16 and allocator.target_bgt == 8  # q_proj, v_proj in 2 layers, r = 4
    assert allocator.budget_schedule(0) == (16, False)
    assert allocator.budget_schedule(2) == (16, False)
    assert allocator.budget_schedule(3) == (13, False)
    assert allocator.budget_schedule(4) == (10, True)
    assert allocator.budget_schedule(9) == (8, False)  # the budgeting phase's end: the final mask comes from step()
    assert allocator.budget_schedule(10) == (8, True)
    assert allocator.budget_schedule(100) == (8, True)


@pytest.mark.parametrize(
    "schedule",
    [SCHEDULE, dict(init_r=12, target_r=8, tinit=5, tfinal=7, deltaT=3, total_step=50), dict(init_r=6, target_r=1, total_step=9)],
)
def test_budget_schedule_matches_peft(schedule):
    theirs, ours = _pair(**schedule)
    mine, peft_alloc = ours.base_model.allocation.rank_allocator(), theirs.base_model.rankallocator
    assert (mine.init_bgt, mine.target_bgt) == (peft_alloc.init_bgt, peft_alloc.target_bgt)
    for step in range(-1, schedule["total_step"] + 3):
        assert mine.budget_schedule(step) == peft_alloc.budget_schedule(step), step


# ----------------------------------------------------------------------------- full training run vs PEFT


def test_full_schedule_matches_peft_update_and_allocate():
    """Same data, SGD, PEFT's loop in both: the same EMAs and E (to rounding) and the same patterns
    every step, with the allocator's state saved and restored into a rebuilt allocator mid-schedule.
    (Bit-for-bit equality, with the same gradients in both: test_scores_and_masks_match_peft_with_ties.)"""
    def close(a, b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)

    theirs, ours = _pair(task_type="CAUSAL_LM", **SCHEDULE)
    tuner, peft_alloc = ours.base_model, theirs.base_model.rankallocator
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05) for m in (theirs, ours)]
    T, F = SCHEDULE["total_step"], SCHEDULE["tfinal"]
    returned = {}
    for step in range(T + 3):
        ids = _batches()[step % 4]
        losses = []
        for model, opt in zip((theirs, ours), opts):
            loss = model(input_ids=ids, labels=ids).loss  # both include the orthogonal term
            loss.backward()
            opt.step()
            result = model.base_model.update_and_allocate(step)
            opt.zero_grad()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-6, step
        if result is not None:
            returned[step] = result
        allocator = tuner.allocation.rank_allocator()
        if step < T - F:  # PEFT's EMAs, entry by entry (the two forwards round differently: close, not equal)
            assert allocator.exp_avg_ipt.keys() == {k.removesuffix(f".{ADAPTER}") for k in peft_alloc.exp_avg_ipt}
            for key, value in peft_alloc.exp_avg_ipt.items():
                close(allocator.exp_avg_ipt[key.removesuffix(f".{ADAPTER}")], value)
                close(allocator.exp_avg_unc[key.removesuffix(f".{ADAPTER}")], peft_alloc.exp_avg_unc[key])
        if step == 5:  # resume: the state goes into a new allocator (the old one is dropped)
            state = tuner.allocator_state_dict()
            tuner.allocation.reset()
            tuner.load_allocator_state_dict(state)
            assert tuner.allocation.rank_allocator() is not allocator
        assert _strip(ours.peft_config[ADAPTER].rank_pattern) == _strip(theirs.peft_config[ADAPTER].rank_pattern), step
        peft_trips = _peft_triplets(theirs)
        for path, (_, lora_e, _) in tuner.triplets().items():
            close(lora_e, peft_trips[path][1])
            assert torch.equal(lora_e == 0, peft_trips[path][1] == 0), (step, path)

    # patterns were returned exactly at the allocation steps (4, 6, 8) and at the final one (9)
    assert sorted(returned) == [4, 6, 8, T - F]
    assert sum(map(sum, returned[4].values())) == 10
    assert returned[T - F] == _strip(theirs.peft_config[ADAPTER].rank_pattern)
    assert sum(map(sum, returned[T - F].values())) == tuner.allocation.rank_allocator().target_bgt
    assert tuner.allocation.rank_allocator().exp_avg_ipt == {}  # the scores are reset after the final allocation


# ----------------------------------------------------------------------------- scores and masks vs PEFT


class _Twin(nn.Module):
    """Two identical parallel layers (``a`` and ``b``) plus a third: ties in the triplet scores."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.c = nn.Linear(6, 5), nn.Linear(6, 5)
        self.b = copy.deepcopy(self.a)

    def forward(self, x):
        return self.a(x) + self.b(x) + self.c(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scores_and_masks_match_peft_with_ties(dtype):
    """Hand-set gradients, every step masking: EMAs, scores (s_E + mean s_A + mean s_B) and masks are
    PEFT's, in the adapter's dtype; two identical modules tie and are pruned together."""
    def make():
        return _Twin().to(dtype)

    schedule = dict(init_r=4, target_r=1, tinit=0, tfinal=0, deltaT=1, total_step=8, target_modules=["a", "b", "c"])
    theirs, ours = _pair(make, autocast_adapter_dtype=False, **schedule)
    with torch.no_grad():  # module b starts as a copy of module a in both libraries
        for model in (theirs, ours):
            for source, target in zip(_trips(model)["a"], _trips(model)["b"]):
                target.copy_(source)
    peft_alloc = theirs.base_model.rankallocator
    for step in range(schedule["total_step"]):
        _set_grads([theirs, ours], seed=step, tie=("a", "b"))
        theirs.base_model.update_and_allocate(step)  # every step is a budgeting step (T - tfinal = 8)
        pattern = ours.base_model.update_and_allocate(step)
        allocator = ours.base_model.allocation.rank_allocator()
        assert all(t.dtype == dtype for t in allocator.exp_avg_ipt.values())
        for key, value in peft_alloc.exp_avg_ipt.items():
            assert torch.equal(allocator.exp_avg_ipt[key.removesuffix(f".{ADAPTER}")], value), key
            assert torch.equal(allocator.exp_avg_unc[key.removesuffix(f".{ADAPTER}")], peft_alloc.exp_avg_unc[key])
        if dtype == torch.float32:
            scores = allocator.scores()
            for path in ("a", "b", "c"):
                s = {part: peft_alloc._element_score(f"{path}.{part}.{ADAPTER}") for part in ("lora_A", "lora_E", "lora_B")}
                expected = s["lora_E"].view(-1) + s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0)
                assert torch.allclose(scores[f"{path}.lora_E"], expected, rtol=1e-6, atol=0)
        if step > 0:
            assert pattern == _strip(theirs.peft_config[ADAPTER].rank_pattern), step
            assert pattern["a.lora_E"] == pattern["b.lora_E"]
        for path, (_, lora_e, _) in ours.base_model.triplets().items():
            assert torch.equal(lora_e, _peft_triplets(theirs)[path][1]), (step, path)
    # the last budget is 3 ranks, but the tied pair sits at the threshold: both go (PEFT's rule), 2 stay
    assert ours.base_model.allocation.rank_allocator().budget_schedule(7) == (3, True) and sum(map(sum, pattern.values())) == 2


def test_target_r_zero_prunes_every_rank():
    """bT = 0: the final allocation's threshold is the largest score, so every rank goes."""
    model = dt.get_peft_model(MLP(), dt.AdaLoraConfig(init_r=3, target_r=0, total_step=2, target_modules=["lin0", "lin1"],
                                                      init_lora_weights=False))
    for step in range(2):
        _set_grads([model], seed=step)
        pattern = model.base_model.update_and_allocate(step)
    assert pattern == {"lin0.lora_E": [False] * 3, "lin1.lora_E": [False] * 3}
    assert all(torch.all(e == 0) for _, e, _ in model.base_model.triplets().values())


# ----------------------------------------------------------------------------- rank-0 modules


def _pruned_trainable(tmp_path, lin1_flags, target_r=1):
    model = dt.get_peft_model(MLP(), dt.AdaLoraConfig(init_r=4, target_r=target_r, total_step=6,
                                                      target_modules=["lin0", "lin1"], init_lora_weights=False))
    model.peft_config[ADAPTER].rank_pattern = {"lin0.lora_E": [True] * 4, "lin1.lora_E": lin1_flags}
    model.save_pretrained(tmp_path)
    return dt.PeftModel.from_pretrained(MLP(), tmp_path, is_trainable=True)


def test_a_module_pruned_to_rank_zero_keeps_training(tmp_path):
    model = _pruned_trainable(tmp_path, [False] * 4)
    tuner = model.base_model
    assert tuner.triplets()["lin1"][0].shape == (0, 20)
    assert tuner.allocation.rank_allocator().init_bgt == 4 and tuner.allocation.rank_allocator().target_bgt == 2
    model.train()
    for step in range(6):
        model(mlp_input()).pow(2).mean().backward()
        pattern = tuner.update_and_allocate(step)
        model.zero_grad()
        if pattern is not None:
            assert pattern["lin1.lora_E"] == [] and len(pattern["lin0.lora_E"]) == 4
    assert sum(model.peft_config[ADAPTER].rank_pattern["lin0.lora_E.default"]) == 2
    reg = dt.orthogonal_regularization(model)  # the rank-0 module counts in N with a norm of 0
    a, _, b = tuner.triplets()["lin0"]
    expected = (torch.linalg.matrix_norm(a @ a.T - torch.eye(4)) + torch.linalg.matrix_norm(b.T @ b - torch.eye(4))) / 4
    assert torch.allclose(reg, expected, rtol=1e-6)


def test_a_budget_already_at_the_target_is_refused(tmp_path):
    model = _pruned_trainable(tmp_path, [True, False, False, False], target_r=3)  # 4 + 1 ranks, target 2 x 3
    model(mlp_input()).pow(2).mean().backward()
    with pytest.raises(ValueError, match="initial rank budget larger than the target"):
        model.base_model.update_and_allocate(0)


# ----------------------------------------------------------------------------- exact keys


class _Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(4, 5)
        self.seq = nn.Module()
        self.seq.q = nn.Linear(4, 5)

    def forward(self, x):
        return self.q(x) + self.seq.q(x)


def test_rank_pattern_keys_are_exact():
    """"q" is a suffix of "seq.q" and "default" a prefix of "default2": neither is confused."""
    model = dt.get_peft_model(_Nested(), dt.AdaLoraConfig(init_r=3, target_r=1, total_step=4, target_modules=["q"],
                                                          init_lora_weights=False))
    model.add_adapter("default2", dt.AdaLoraConfig(init_r=3, target_r=1, total_step=4, target_modules=["q"],
                                                   inference_mode=True))
    tuner = model.base_model
    assert list(tuner.triplets()) == ["q", "seq.q"]
    config = model.peft_config[ADAPTER]
    config.rank_pattern = {"q.lora_E.default": [True, False, True], "seq.q.lora_E.default": [False, True, True]}
    with torch.no_grad():
        for _, e, _ in tuner.triplets().values():
            e.fill_(1.0)
    tuner.update_and_allocate(10)  # the final phase: the config's pattern is applied
    assert tuner.triplets()["q"][1].view(-1).tolist() == [1.0, 0.0, 1.0]
    assert tuner.triplets()["seq.q"][1].view(-1).tolist() == [0.0, 1.0, 1.0]
    assert tuner.triplets("default2")["q"][1].abs().sum() == 0  # the other adapter is untouched (E = 0 at init)
    config.rank_pattern = {"q.lora_E.default2": [True] * 3}
    with pytest.raises(ValueError, match="q.lora_E.default2"):
        tuner.update_and_allocate(10)


# ----------------------------------------------------------------------------- resume and determinism


def test_state_dict_round_trip_and_identical_ranks():
    """Two replicas with the same gradients allocate identically (deterministic algorithms on); a
    model restored from one replica's adapter and allocator state continues exactly like it."""
    schedule = dict(init_r=5, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=10, target_modules=["lin0", "lin1"],
                    init_lora_weights=False)
    torch.manual_seed(7)
    first = dt.get_peft_model(MLP(), dt.AdaLoraConfig(**schedule))
    replicas = [first, copy.deepcopy(first)]
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for step in range(6):
            _set_grads(replicas, seed=100 + step)  # "all-reduced": identical on every rank
            outs = [m.base_model.update_and_allocate(step) for m in replicas]
            assert outs[0] == outs[1]
    finally:
        torch.use_deterministic_algorithms(previous)
    s0, s1 = (m.base_model.allocator_state_dict() for m in replicas)
    assert s0["rank_pattern"] == s1["rank_pattern"] is not None
    for field in ("exp_avg_ipt", "exp_avg_unc"):
        assert s0[field].keys() == {f"{p}.{part}" for p in ("lin0", "lin1") for part in ("lora_A", "lora_E", "lora_B")}
        assert all(torch.equal(s0[field][k], s1[field][k]) for k in s0[field])
    key = next(iter(s0["exp_avg_ipt"]))
    s0["exp_avg_ipt"][key].add_(1.0)  # the state dict holds copies
    assert not torch.equal(s0["exp_avg_ipt"][key], replicas[0].base_model.allocation.rank_allocator().exp_avg_ipt[key])

    restored = dt.get_peft_model(MLP(), dt.AdaLoraConfig(**schedule))
    restored.load_state_dict(replicas[1].state_dict())
    restored.base_model.load_allocator_state_dict(replicas[1].base_model.allocator_state_dict())
    assert restored.peft_config[ADAPTER].rank_pattern == replicas[1].peft_config[ADAPTER].rank_pattern
    for step in range(6, 12):
        _set_grads([replicas[1], restored], seed=100 + step)
        assert replicas[1].base_model.update_and_allocate(step) == restored.base_model.update_and_allocate(step)
        for (_, e1, _), (_, e2, _) in zip(replicas[1].base_model.triplets().values(), restored.base_model.triplets().values()):
            assert torch.equal(e1, e2)

    bad = replicas[0].base_model.allocator_state_dict()
    bad["exp_avg_ipt"] = {k.replace("lin", "layer"): v for k, v in bad["exp_avg_ipt"].items()}
    with pytest.raises(ValueError, match="does not match the adapter"):
        restored.base_model.load_allocator_state_dict(bad)
    bad = dict(replicas[0].base_model.allocator_state_dict(), rank_pattern={"lin0.lora_E": [True] * 2})
    with pytest.raises(ValueError, match="rank pattern does not match"):
        restored.base_model.load_allocator_state_dict(bad)


# ----------------------------------------------------------------------------- orthogonal regulariser


def _peft_formula(peft_model):
    total, n = 0, 0
    for name, p in peft_model.base_model.model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and ADAPTER in name:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            total = total + torch.norm(cov - torch.eye(*cov.size()), p="fro")
            n += 1
    return total / n


def test_orthogonal_regularization_matches_peft_forward():
    theirs, ours = _pair(task_type="CAUSAL_LM", orth_reg_weight=0.7, **SCHEDULE)
    ids = _batches(1, seed=5)[0]
    with torch.no_grad():
        with_reg = theirs(input_ids=ids, labels=ids).loss
        plain = theirs.base_model.model(input_ids=ids, labels=ids).loss
        assert abs(ours(input_ids=ids, labels=ids).loss.item() - with_reg.item()) <= 1e-6
    triplets = _peft_triplets(theirs)
    value = orthogonal_regularization(triplets)
    assert value.dim() == 0
    assert math.isclose(float(with_reg - plain), 0.7 * float(value.detach()), rel_tol=1e-5, abs_tol=1e-6)
    assert torch.allclose(value, _peft_formula(theirs), rtol=0, atol=1e-6)
    assert torch.equal(dt.orthogonal_regularization(ours), orthogonal_regularization(ours.base_model.triplets()))

    value.backward()  # gradients agree with PEFT's formula
    grads = [p.grad.clone() for t in triplets.values() for p in (t[0], t[2])]
    assert all(t[1].grad is None for t in triplets.values())  # E is not regularised
    theirs.zero_grad()
    _peft_formula(theirs).backward()
    for g, p in zip(grads, (p for t in triplets.values() for p in (t[0], t[2]))):
        assert torch.allclose(g, p.grad, rtol=0, atol=1e-6)


def test_orthogonal_regularization_zero_rank_and_empty():
    g = torch.Generator().manual_seed(2)
    triplets = {f"m{i}": tuple(nn.Parameter(torch.randn(*s, generator=g)) for s in ((3, 5), (3, 1), (6, 3))) for i in range(2)}
    expected = sum(torch.linalg.matrix_norm(a @ a.T - torch.eye(3)) + torch.linalg.matrix_norm(b.T @ b - torch.eye(3))
                   for a, _, b in triplets.values())
    triplets["empty"] = (nn.Parameter(torch.zeros(0, 5)), nn.Parameter(torch.zeros(0, 1)), nn.Parameter(torch.zeros(6, 0)))
    value = orthogonal_regularization(triplets)
    assert torch.allclose(value, expected / 6, rtol=1e-6)  # PEFT counts the rank-0 module's two matrices in N
    value.backward()
    assert triplets["empty"][0].grad.shape == (0, 5)
    assert float(orthogonal_regularization({})) == 0.0


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(init_r=2, target_r=2), "init_r > target_r"),
        (dict(init_r=1, target_r=2), "init_r > target_r"),
        (dict(beta1=0.0), "beta1"),
        (dict(beta1=1.0), "beta1"),
        (dict(beta2=1.5), "beta2"),
        (dict(beta2=-0.1), "beta2"),
    ],
)
def test_values_only_the_allocator_uses_are_checked_for_a_trainable_adapter(kwargs, match):
    config = dt.AdaLoraConfig(**{"total_step": 12, "target_modules": ["lin0"], **kwargs})
    with pytest.raises(ValueError, match=match):
        dt.get_peft_model(MLP(), config)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(tinit=9, tfinal=3), "budgeting phase"), (dict(deltaT=0), "deltaT"), (dict(beta1=float("nan")), "beta1"),
     (dict(target_r=-1), "target_r")],
)
def test_invalid_schedule_is_refused_with_the_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dt.AdaLoraConfig(**{"total_step": 12, **kwargs})


def test_missing_grad_names_the_parameter_and_changes_nothing():
    model = dt.get_peft_model(MLP(), dt.AdaLoraConfig(init_r=4, target_r=2, total_step=12, target_modules=["lin0", "lin1"]))
    _set_grads([model], seed=0)
    model.base_model.triplets()["lin1"][2].grad = None
    with pytest.raises(ValueError, match=r"lin1\.lora_B"):
        model.base_model.update_and_allocate(0)
    assert model.base_model.allocation.rank_allocator().exp_avg_ipt == {}  # nothing half-updated


def test_final_allocation_without_scores_is_an_error():
    model = dt.get_peft_model(MLP(), dt.AdaLoraConfig(**SCHEDULE, target_modules=["lin0", "lin1"]))
    _set_grads([model], seed=0)
    with pytest.raises(RuntimeError, match="No importance scores"):  # step T - tfinal before any scoring step
        model.base_model.update_and_allocate(SCHEDULE["total_step"] - SCHEDULE["tfinal"])
