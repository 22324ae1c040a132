"""AdaLoRA rank allocator / orthogonal regulariser against PEFT 0.21.2."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

import peft  # noqa: E402  (pinned test dependencies: imported, never skipped)
import transformers  # noqa: E402

from peft import AdaLoraConfig, get_peft_model  # noqa: E402
from peft.tuners.adalora import AdaLoraLayer  # noqa: E402
from peft.tuners.adalora.layer import RankAllocator as PeftRankAllocator  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from deltatune.methods._adalora_alloc import RankAllocator, orthogonal_regularization  # noqa: E402

ADAPTER = "default"
SCHEDULE = dict(init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=12)


# ----------------------------------------------------------------------------- helpers


def _tiny_peft_model(seed: int = 0, orth_reg_weight: float = 0.5):
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    peft_config = AdaLoraConfig(
        task_type="CAUSAL_LM",
        init_lora_weights=False,
        lora_alpha=8,
        orth_reg_weight=orth_reg_weight,
        **SCHEDULE,
    )
    return get_peft_model(model, peft_config)


def _triplets_of(peft_model) -> dict:
    """``{path relative to the inner model: (A, E, B)}`` in module order."""
    inner = peft_model.base_model.model
    return {
        name: (module.lora_A[ADAPTER], module.lora_E[ADAPTER], module.lora_B[ADAPTER])
        for name, module in inner.named_modules()
        if isinstance(module, AdaLoraLayer) and ADAPTER in module.lora_A
    }


def _strip(pattern):
    if pattern is None:
        return None
    suffix = f".{ADAPTER}"
    out = {}
    for key, value in pattern.items():
        assert key.endswith(suffix), key
        out[key[: -len(suffix)]] = [bool(v) for v in value]
    return out


def _batches(n: int = 4, seed: int = 123):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (2, 8), generator=gen) for _ in range(n)]


def _fake_triplets(n_modules=4, r=4, in_f=5, out_f=6, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    triplets = {}
    for i in range(n_modules):
        triplets[f"layers.{i}.proj"] = (
            nn.Parameter(torch.randn(r, in_f, generator=gen).to(dtype)),
            nn.Parameter(torch.randn(r, 1, generator=gen).to(dtype)),
            nn.Parameter(torch.randn(out_f, r, generator=gen).to(dtype)),
        )
    return triplets


def _set_random_grads(triplets, seed):
    gen = torch.Generator().manual_seed(seed)
    for triplet in triplets.values():
        for p in triplet:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


class _FakeAdaLoraModel(nn.Module):
    """Holds triplets under PEFT's parameter names ``<path>.lora_X.default`` for PEFT's RankAllocator."""

    def __init__(self, triplets):
        super().__init__()
        self.layers = nn.ModuleList()
        for lora_a, lora_e, lora_b in triplets.values():
            sub = nn.Module()
            sub.proj = nn.Module()
            sub.proj.lora_A = nn.ParameterDict({ADAPTER: lora_a})
            sub.proj.lora_E = nn.ParameterDict({ADAPTER: lora_e})
            sub.proj.lora_B = nn.ParameterDict({ADAPTER: lora_b})
            self.layers.append(sub)


# ----------------------------------------------------------------------------- schedule


def test_budget_schedule_values():
    alloc = RankAllocator(_fake_triplets(), **SCHEDULE)
    assert alloc.init_bgt == 16 and alloc.target_bgt == 8
    assert alloc.budget_schedule(0) == (16, False)
    assert alloc.budget_schedule(2) == (16, False)
    assert alloc.budget_schedule(3) == (13, False)
    assert alloc.budget_schedule(4) == (10, True)
    assert alloc.budget_schedule(9) == (8, False)  # budgeting phase's end: mask comes from step()
    assert alloc.budget_schedule(10) == (8, True)
    assert alloc.budget_schedule(100) == (8, True)


@pytest.mark.parametrize(
    "schedule",
    [SCHEDULE, dict(init_r=12, target_r=8, tinit=5, tfinal=7, deltaT=3, total_step=50), dict(init_r=6, target_r=1, total_step=9)],
)
def test_budget_schedule_matches_peft(schedule):
    triplets = _fake_triplets(n_modules=3, r=schedule["init_r"])
    ours = RankAllocator(triplets, **schedule)
    theirs = PeftRankAllocator(_FakeAdaLoraModel(copy.deepcopy(triplets)), AdaLoraConfig(**schedule), ADAPTER)
    assert (ours.init_bgt, ours.target_bgt) == (theirs.init_bgt, theirs.target_bgt)
    for step in range(-1, schedule["total_step"] + 3):
        assert ours.budget_schedule(step) == theirs.budget_schedule(step), step


# ----------------------------------------------------------------------------- full training run vs PEFT


def test_full_schedule_matches_peft_update_and_allocate():
    peft_model = _tiny_peft_model()
    our_model = copy.deepcopy(peft_model)
    inner = our_model.base_model.model
    triplets = _triplets_of(our_model)
    assert len(triplets) == 4  # q_proj, v_proj in 2 layers
    orth_weight = our_model.peft_config[ADAPTER].orth_reg_weight

    alloc = RankAllocator(triplets, **SCHEDULE)
    peft_params = [p for p in peft_model.parameters() if p.requires_grad]
    our_params = [p for p in our_model.parameters() if p.requires_grad]
    peft_opt = torch.optim.SGD(peft_params, lr=0.05)
    our_opt = torch.optim.SGD(our_params, lr=0.05)
    batches = _batches()
    peft_config = peft_model.peft_config[ADAPTER]
    T, F = SCHEDULE["total_step"], SCHEDULE["tfinal"]

    returned = {}
    for step in range(T + 3):
        ids = batches[step % len(batches)]

        peft_loss = peft_model(input_ids=ids, labels=ids).loss  # includes PEFT's orth. regulariser
        peft_loss.backward()
        peft_opt.step()
        peft_model.base_model.update_and_allocate(step)
        peft_opt.zero_grad()

        our_loss = inner(input_ids=ids, labels=ids).loss + orth_weight * orthogonal_regularization(triplets)
        assert torch.allclose(our_loss, peft_loss, rtol=0, atol=1e-6), step
        our_loss.backward()
        our_opt.step()
        result = alloc.step(step)
        our_opt.zero_grad()
        if result is not None:
            returned[step] = result

        if step == 5:  # resume from a checkpoint of the allocator state mid-schedule
            state = alloc.state_dict()
            alloc = RankAllocator(triplets, **SCHEDULE)
            alloc.load_state_dict(state)

        assert alloc.rank_pattern == _strip(peft_config.rank_pattern), step
        for path, (_, lora_e, _) in triplets.items():
            peft_e = peft_model.base_model.model.get_submodule(path).lora_E[ADAPTER]
            assert torch.equal(lora_e, peft_e), (step, path)

    # patterns were returned exactly at the allocation steps (4, 6, 8) and at the final one (9)
    assert sorted(returned) == [4, 6, 8, T - F]
    assert sum(map(sum, returned[4].values())) <= 10
    final = returned[T - F]
    assert final == _strip(peft_config.rank_pattern)
    assert sum(map(sum, final.values())) == alloc.target_bgt
    assert alloc.exp_avg_ipt == {}  # importance state reset after the final allocation
    for key, flags in final.items():
        lora_e = triplets[key[: -len(".lora_E")]][1]
        assert torch.all(lora_e.view(-1)[~torch.tensor(flags)] == 0)

    peft_state = dict(peft_model.named_parameters())
    for name, p in our_model.named_parameters():
        assert torch.allclose(p, peft_state[name], rtol=0, atol=1e-6), name


# ----------------------------------------------------------------------------- direct comparison with PEFT's allocator


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_and_mask_match_peft_rank_allocator(dtype):
    triplets = _fake_triplets(n_modules=4, r=4, dtype=dtype, seed=1)
    # two identical modules -> tied triplet scores; ties at the threshold are pruned together
    lora_a, lora_e, lora_b = triplets["layers.0.proj"]
    triplets["layers.4.proj"] = tuple(nn.Parameter(t.detach().clone()) for t in (lora_a, lora_e, lora_b))
    theirs_triplets = copy.deepcopy(triplets)
    schedule = dict(init_r=4, target_r=2, tinit=0, tfinal=0, total_step=20)
    ours = RankAllocator(triplets, **schedule)
    theirs = PeftRankAllocator(_FakeAdaLoraModel(theirs_triplets), AdaLoraConfig(**schedule), ADAPTER)
    fake = _FakeAdaLoraModel(theirs_triplets)

    for round_, budget in enumerate([19, 18, 15, 13, 12, 10, 9]):
        for tr in (triplets, theirs_triplets):
            _set_random_grads(tr, seed=round_)
            g0 = tr["layers.0.proj"]
            for p, q in zip(g0, tr["layers.4.proj"]):
                q.grad = p.grad.clone()
        ours.update_ipt()
        theirs.update_ipt(fake)
        for name, p in fake.named_parameters():
            key = name[: -len(f".{ADAPTER}")]
            assert ours.exp_avg_ipt[key].dtype == theirs.exp_avg_ipt[name].dtype == dtype
            assert torch.equal(ours.exp_avg_ipt[key], theirs.exp_avg_ipt[name])
            assert torch.equal(ours.exp_avg_unc[key], theirs.exp_avg_unc[name])
        if dtype == torch.float32:
            # triplet score = s_E + mean over columns of s_A + mean over rows of s_B, s = EMA_ipt * EMA_unc
            scores = ours.triplet_scores()
            for path in triplets:
                s = {part: theirs._element_score(f"{path}.{part}.{ADAPTER}") for part in ("lora_A", "lora_E", "lora_B")}
                expected = s["lora_E"].view(-1) + s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0)
                assert torch.allclose(scores[f"{path}.lora_E"], expected, rtol=1e-6, atol=0)
        pattern = ours.mask_to_budget(budget)
        assert pattern == _strip(theirs.mask_to_budget(fake, budget))
        assert pattern["layers.0.proj.lora_E"] == pattern["layers.4.proj.lora_E"]
        for key, (a, e, b) in triplets.items():
            assert torch.equal(e, theirs_triplets[key][1])


def test_nothing_to_prune_when_budget_equals_initial_budget():
    triplets = _fake_triplets()
    before = {k: t[1].detach().clone() for k, t in triplets.items()}
    alloc = RankAllocator(triplets, **SCHEDULE)
    # works even before any importance update (k = 0 needs no scores)
    pattern = alloc.mask_to_budget(alloc.init_bgt)
    assert pattern == {f"{k}.lora_E": [True] * 4 for k in triplets}
    _set_random_grads(triplets, seed=0)
    alloc.update_ipt()
    assert alloc.mask_to_budget(alloc.init_bgt) == pattern
    for k, t in triplets.items():
        assert torch.equal(t[1], before[k])
    # budget 0 prunes everything
    pattern = alloc.mask_to_budget(0)
    assert not any(any(v) for v in pattern.values())
    assert all(torch.all(t[1] == 0) for t in triplets.values())


def test_zero_rank_module_is_handled():
    triplets = _fake_triplets(n_modules=3, r=4)
    triplets["empty"] = (
        nn.Parameter(torch.zeros(0, 5)),
        nn.Parameter(torch.zeros(0, 1)),
        nn.Parameter(torch.zeros(6, 0)),
    )
    alloc = RankAllocator(triplets, target_r=2, total_step=10)
    assert alloc.init_bgt == 12 and alloc.target_bgt == 8
    _set_random_grads({k: v for k, v in triplets.items() if k != "empty"}, seed=3)  # empty ones: grad None
    alloc.update_ipt()
    pattern = alloc.mask_to_budget(9)
    assert pattern["empty.lora_E"] == []
    assert sum(map(sum, pattern.values())) == 9


# ----------------------------------------------------------------------------- exact keys and rank patterns


def test_rank_pattern_keys_are_exact():
    gen = torch.Generator().manual_seed(0)
    # "q" is a substring of "seq.q" and "default" of "default2": keys must not be confused
    paths = ["q", "seq.q", "default", "default2"]
    triplets = {
        p: (nn.Parameter(torch.randn(3, 4, generator=gen)), nn.Parameter(torch.ones(3, 1)), nn.Parameter(torch.randn(5, 3, generator=gen)))
        for p in paths
    }
    alloc = RankAllocator(triplets, target_r=1, total_step=5)
    assert alloc.keys == [f"{p}.lora_E" for p in paths]
    pattern = {
        "q.lora_E": [True, False, True],
        "seq.q.lora_E": [False, True, True],
        "default.lora_E": [True, True, False],
        "default2.lora_E": [False, False, True],
    }
    alloc.apply_rank_pattern(pattern)
    for p in paths:
        assert triplets[p][1].view(-1).tolist() == [float(f) for f in pattern[f"{p}.lora_E"]]

    with pytest.raises(KeyError, match="seq.q.lora_E"):
        alloc.apply_rank_pattern({k: v for k, v in pattern.items() if k != "seq.q.lora_E"})
    with pytest.raises(ValueError, match="no known module"):
        alloc.apply_rank_pattern({f"{k}.default": v for k, v in pattern.items()})
    with pytest.raises(ValueError, match="3"):
        alloc.apply_rank_pattern({**pattern, "q.lora_E": [True, False]})
    alloc.rank_pattern = pattern
    assert alloc.rank_pattern == pattern
    alloc.rank_pattern["q.lora_E"][0] = False  # a copy is returned
    assert alloc.rank_pattern == pattern


# ----------------------------------------------------------------------------- state dict and determinism


def test_state_dict_round_trip_and_identical_ranks():
    base = _fake_triplets(n_modules=3, r=5, seed=7)
    ranks = [copy.deepcopy(base) for _ in range(2)]
    schedule = dict(init_r=5, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=10)
    allocs = [RankAllocator(tr, **schedule) for tr in ranks]
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for step in range(6):
            outs = []
            for tr, alloc in zip(ranks, allocs):
                _set_random_grads(tr, seed=100 + step)  # "all-reduced": identical on every rank
                outs.append(alloc.step(step))
            assert outs[0] == outs[1]
    finally:
        torch.use_deterministic_algorithms(previous)
    s0, s1 = (a.state_dict() for a in allocs)
    assert s0["rank_pattern"] == s1["rank_pattern"] is not None
    for field in ("exp_avg_ipt", "exp_avg_unc"):
        assert s0[field].keys() == s1[field].keys() == set(allocs[0]._params)
        for k in s0[field]:
            assert torch.equal(s0[field][k], s1[field][k])

    # the state dict holds copies
    key = next(iter(s0["exp_avg_ipt"]))
    s0["exp_avg_ipt"][key].add_(1.0)
    assert not torch.equal(s0["exp_avg_ipt"][key], allocs[0].exp_avg_ipt[key])

    # a restored allocator continues exactly like the original
    restored_triplets = copy.deepcopy(ranks[1])
    restored = RankAllocator(restored_triplets, **schedule)
    restored.load_state_dict(allocs[1].state_dict())
    for step in range(6, 12):
        _set_random_grads(ranks[1], seed=100 + step)
        _set_random_grads(restored_triplets, seed=100 + step)
        assert allocs[1].step(step) == restored.step(step)
        for k in base:
            assert torch.equal(ranks[1][k][1], restored_triplets[k][1])

    other = RankAllocator(_fake_triplets(n_modules=3, r=5, seed=0), **schedule)
    bad = allocs[0].state_dict()
    bad["exp_avg_ipt"] = {k.replace("layers", "blocks"): v for k, v in bad["exp_avg_ipt"].items()}
    with pytest.raises(ValueError):
        other.load_state_dict(bad)


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
    peft_model = _tiny_peft_model(seed=3, orth_reg_weight=0.7)
    ids = _batches(1, seed=5)[0]
    with torch.no_grad():
        with_reg = peft_model(input_ids=ids, labels=ids).loss
        plain = peft_model.base_model.model(input_ids=ids, labels=ids).loss
    triplets = _triplets_of(peft_model)
    ours = orthogonal_regularization(triplets)
    assert ours.dim() == 0
    assert math.isclose(float(with_reg - plain), 0.7 * float(ours.detach()), rel_tol=1e-5, abs_tol=1e-6)
    assert torch.allclose(ours, _peft_formula(peft_model), rtol=0, atol=1e-6)

    # gradients agree with PEFT's formula
    ours.backward()
    ours_grads = [p.grad.clone() for t in triplets.values() for p in (t[0], t[2])]
    assert all(t[1].grad is None for t in triplets.values())  # E is not regularised
    peft_model.zero_grad()
    _peft_formula(peft_model).backward()
    for g, p in zip(ours_grads, (p for t in triplets.values() for p in (t[0], t[2]))):
        assert torch.allclose(g, p.grad, rtol=0, atol=1e-6)


def test_orthogonal_regularization_zero_rank_and_empty():
    triplets = _fake_triplets(n_modules=2, r=3, seed=2)
    expected = sum(
        torch.linalg.matrix_norm(a @ a.T - torch.eye(3)) + torch.linalg.matrix_norm(b.T @ b - torch.eye(3))
        for a, _, b in triplets.values()
    )
    triplets["empty"] = (nn.Parameter(torch.zeros(0, 5)), nn.Parameter(torch.zeros(0, 1)), nn.Parameter(torch.zeros(6, 0)))
    value = orthogonal_regularization(triplets)
    # PEFT counts the rank-0 module's two matrices in N (their norm is 0)
    assert torch.allclose(value, expected / 6, rtol=1e-6)
    value.backward()
    assert triplets["empty"][0].grad.shape == (0, 5)
    assert all(torch.isfinite(t[0].grad).all() for t in triplets.values())
    assert float(orthogonal_regularization({})) == 0.0


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(init_r=2, target_r=2), "init_r"),
        (dict(init_r=1, target_r=2), "init_r"),
        (dict(target_r=4), "budget"),  # no init_r: 4 modules x 4 ranks is not above 4 x 4
        (dict(target_r=2, beta1=0.0), "beta1"),
        (dict(target_r=2, beta1=1.0), "beta1"),
        (dict(target_r=2, beta1=float("nan")), "beta1"),
        (dict(target_r=2, beta2=1.5), "beta2"),
        (dict(target_r=2, beta2=-0.1), "beta2"),
        (dict(target_r=2, tinit=9, tfinal=3), "budgeting phase"),
        (dict(target_r=2, deltaT=0), "deltaT"),
    ],
)
def test_invalid_configuration(kwargs, match):
    kwargs = {"total_step": 12, **kwargs}
    with pytest.raises(ValueError, match=match):
        RankAllocator(_fake_triplets(), **kwargs)


def test_missing_grad_names_the_parameter():
    triplets = _fake_triplets()
    _set_random_grads(triplets, seed=0)
    triplets["layers.2.proj"][2].grad = None
    alloc = RankAllocator(triplets, **SCHEDULE)
    with pytest.raises(ValueError, match=r"layers\.2\.proj\.lora_B"):
        alloc.update_ipt()
    assert alloc.exp_avg_ipt == {}  # nothing half-updated


def test_out_of_order_calls_raise_clearly():
    triplets = _fake_triplets()
    alloc = RankAllocator(triplets, **SCHEDULE)
    with pytest.raises(RuntimeError, match="update_ipt"):
        alloc.mask_to_budget(10)
    with pytest.raises(RuntimeError, match="rank pattern"):
        alloc.step(SCHEDULE["total_step"] - SCHEDULE["tfinal"] + 1)
    with pytest.raises(ValueError, match="budget"):
        alloc.mask_to_budget(alloc.init_bgt + 1)
    with pytest.raises(ValueError, match="shape"):
        RankAllocator({"m": (torch.zeros(3, 4), torch.zeros(2, 1), torch.zeros(5, 3))}, target_r=1, total_step=5)
