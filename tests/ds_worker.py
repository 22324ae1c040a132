"""One DeepSpeed worker (CPU accelerator, gloo) that trains every method under ZeRO-2 and ZeRO-3.

    DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc_per_node 2 --master_port P \
        tests/ds_worker.py --out DIR [--modes zero2,zero3_init,...] [--cases bone-llama-all-linear,...] [--zero3-cases bone-gpt2,...]

Modes:

* ``zero2``: the model and its adapter built as usual, then ``deepspeed.initialize`` with ZeRO stage 2;
* ``zero2_accum``: the same with 2 micro-batches per optimizer step (gradient accumulation: AdaLoRA
  must allocate once per optimizer step, from the accumulated gradients);
* ``zero3_init``: base model *and* adapter built inside ``deepspeed.zero.Init`` (every parameter is
  partitioned from birth), then ZeRO stage 3;
* ``zero3_after``: the base built inside ``zero.Init``, the adapter added afterwards, then ZeRO stage 3.

ZeRO-3 runs with ``stage3_param_persistence_threshold: 0`` so that the tiny test tensors are
partitioned too (by default DeepSpeed keeps tensors under 100k elements whole, which would hide
every partitioning bug). A plain ``torch.optim.AdamW`` is passed to ``deepspeed.initialize``
(``zero_allow_untested_optimizer``), so no DeepSpeed C++ op is compiled.

A single launch loops over modes and cases (a launch costs seconds of imports, an engine well under
one). Rank 0 writes ``DIR/results.json`` after every case: ``{mode: {case id: [rank 0, rank 1]}}``;
tests/test_deepspeed.py asserts on it. Errors are recorded per case, not raised.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from worker_loop import run_all, save_counting_writes  # noqa: E402

STEPS = 3
MODES = ("zero2", "zero2_accum", "zero3_init", "zero3_after")
ACCUM = 2  # micro-batches per optimizer step in zero2_accum


def model_cases(cases, model: str = "llama") -> list:
    """The first case of every variant (the case id's prefix: bone, bat, adalora, …) on a tiny
    transformers model ("llama": Linear layers; "gpt2": Conv1D), whose labels give a loss, so
    AdaLoRA's orthogonal regulariser runs too."""
    seen, out = set(), []
    for case in cases:
        variant = case.id.split("-")[0]
        if case.model == model and variant not in seen:
            seen.add(variant)
            out.append(case)
    return out


def ds_config(stage: int, accum: int = 1) -> dict:
    zero: dict = {"stage": stage}
    if stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0)
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": accum,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def make_batch(rank: int, step: int):
    import torch

    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(0, 64, (2, 8), generator=g)  # different data on every rank and step
    return {"input_ids": ids, "labels": ids}


def full_values(model, names) -> dict:
    """Whole copies of the named parameters (gathered where ZeRO-3 partitioned them)."""
    import deepspeed

    params = dict(model.named_parameters())
    chosen = [params[n] for n in names]
    ctx = deepspeed.zero.GatheredParameters(chosen, modifier_rank=None) if any(hasattr(p, "ds_id") for p in chosen) \
        else contextlib.nullcontext()
    with ctx:
        return {n: params[n].detach().float().clone() for n in names}


def base_weights(model) -> dict:
    """The frozen base model's state dict under its own names (gathered where ZeRO-3 partitioned it)."""
    import deepspeed

    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    partitioned = [p for p in frozen.values() if hasattr(p, "ds_id")]
    ctx = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None) if partitioned else contextlib.nullcontext()
    with ctx:
        values = {n: p.detach().clone() for n, p in frozen.items()}
    return {n.removeprefix("base_model.model.").replace(".base_layer.", "."): v for n, v in values.items()}


def no_dropout(model) -> None:
    """Dropout off (GPT-2 has it): the reference run draws no masks in the same order as the ranks."""
    import torch.nn as nn

    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def load_base(model, base_sd: dict) -> None:
    """Load the base weights; a tied weight (GPT-2's lm_head) arrives through the tensor it shares."""
    missing, unexpected = model.load_state_dict(base_sd, strict=False)
    tied = set(model.state_dict()) - set(dict(model.named_parameters())) - set(dict(model.named_buffers()))
    assert not unexpected and set(missing) <= tied, (unexpected, missing)


def reference(case, base_sd: dict, init: dict, buffers: dict, world: int, accum: int) -> dict:
    """The same training without DeepSpeed, in this process, from the same weights and buffers: both
    ranks' batches per step, gradients averaged (what data parallelism computes), torch's AdamW,
    AdaLoRA allocating after the step."""
    import torch

    import deltatune as dt
    from conftest import build

    fresh, _ = build(case.model)
    load_base(fresh, base_sd)
    model = dt.get_peft_model(fresh, case.config())
    model.train()
    no_dropout(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in init:
                p.copy_(init[n])
        for n, b in model.named_buffers():
            if n in buffers:
                b.copy_(buffers[n])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tuner = model.base_model
    for step in range(STEPS):
        opt.zero_grad()
        for r in range(world):
            for micro in range(accum):
                (model(**make_batch(r, step * accum + micro)).loss / (world * accum)).backward()
        opt.step()
        if callable(getattr(tuner, "update_and_allocate", None)):
            tuner.update_and_allocate(step)
    return {n: p.detach().float() for n, p in model.named_parameters() if n in init}


def run_case(case, mode: str, out_dir: str) -> dict:
    import deepspeed
    import torch
    import torch.distributed as dist

    import deltatune as dt
    from conftest import build
    from deltatune.integrations import deepspeed as dsi
    from deltatune.integrations import distributed as dd

    rank = dist.get_rank()
    info: dict = {"rank": rank}
    accum = ACCUM if mode.endswith("_accum") else 1
    config = ds_config(3 if mode.startswith("zero3") else 2, accum)
    if mode == "zero3_init":
        with deepspeed.zero.Init(config_dict_or_path=config):
            base, inputs = build(case.model)
            model = dt.get_peft_model(base, case.config())
    elif mode == "zero3_after":
        with deepspeed.zero.Init(config_dict_or_path=config):
            base, inputs = build(case.model)
        model = dt.get_peft_model(base, case.config())
    else:
        base, inputs = build(case.model)
        model = dt.get_peft_model(base, case.config())
    tuner = model.base_model
    ada = callable(getattr(tuner, "update_and_allocate", None))
    model.train()
    no_dropout(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    init = full_values(model, names)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    manual = ada and mode == "zero3_after"  # the two calls attach_adalora makes, written out
    if ada and not manual:
        dsi.attach_adalora(engine)  # allocation after every engine.step(), with the gradients read before it
    info["partitioned"] = sum(hasattr(p, "ds_id") for p in model.parameters())
    torch.manual_seed(100 + rank)
    losses = []
    for step in range(STEPS):
        for micro in range(accum):
            out = engine(**make_batch(rank, step * accum + micro))
            engine.backward(out.loss)
            if manual:
                tuner.capture_gradients()  # engine.step() frees them
            engine.step()  # updates at the accumulation boundary only
            if manual:
                tuner.update_and_allocate(step)
        losses.append(float(out.loss))
    info["losses"] = losses
    final = full_values(model, names)
    flat = torch.cat([final[n].flatten() for n in names])
    info["digest"] = dd._digest(flat)
    info["changed"] = max(float((final[n] - init[n]).abs().max()) for n in names)
    base_sd = base_weights(model)
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    ref = reference(case, base_sd, init, buffers, dist.get_world_size(), accum)
    # frozen buffers (FourierFT positions, RandLoRA bases) as a model built without DeepSpeed has them
    plain = dt.get_peft_model(build(case.model)[0], case.config())
    info["buffers_vs_plain"] = {
        n: float((b.float() - buffers[n].float()).abs().max()) for n, b in plain.named_buffers()
        if n in buffers and (b.shape != buffers[n].shape or not torch.equal(b, buffers[n]))
    }
    info["vs_reference"] = max(float((final[n] - ref[n]).abs().max()) for n in names)
    if os.environ.get("DS_WORKER_DEBUG"):
        info["worst"] = sorted(((float((final[n] - ref[n]).abs().max()), n) for n in names), reverse=True)[:4]
        info["init_norm"] = {n: float(init[n].norm()) for n in names[:6]}
    if ada:
        info["rank_pattern"] = tuner.peft_config["default"].rank_pattern
        info["allocation_calls"] = tuner.allocation_calls
        if mode == "zero2":  # no gradients captured before the step: a clear error, on every rank alike
            try:
                tuner.update_and_allocate(STEPS)
                info["uncaptured_error"] = None
            except RuntimeError as exc:
                info["uncaptured_error"] = str(exc)
        # the mask reached the weights the model computes with (not only DeepSpeed's fp32 copy)
        pattern = info["rank_pattern"] or {}
        pruned = 0.0
        for key, flags in pattern.items():
            e = final[f"base_model.model.{key[: -len('.lora_E.default')]}.adapters.default.lora_E"]
            pruned = max([pruned] + [abs(float(e[i])) for i, keep in enumerate(flags) if not keep])
        info["pruned_max_abs"] = pruned

    # save once (rank 0), load everywhere into a plain model, compare outputs in eval mode
    folder = os.path.join(out_dir, mode, case.id)
    info.update(save_counting_writes(engine, folder))
    engine.eval()
    with torch.no_grad():
        trained = engine(**inputs).logits.float()
    fresh, _ = build(case.model)
    load_base(fresh, base_sd)  # zero.Init skips transformers' weight init: copy the trained base
    loaded = dt.PeftModel.from_pretrained(fresh, folder)
    with torch.no_grad():
        info["load_diff"] = float((loaded(**inputs).logits.float() - trained).abs().max())
    engine.destroy()
    return info


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", default="", help="case ids for every mode (default: model_cases(llama))")
    parser.add_argument("--zero3-cases", default="", help="more case ids for the ZeRO-3 modes only")
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args()

    import logging
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import deepspeed
    import torch.distributed as dist

    deepspeed.utils.logger.setLevel(logging.WARNING)
    # DeepSpeed's CPU accelerator JIT-compiles a C++ shared-memory all-reduce when its process group
    # starts (seconds to minutes on a fresh machine, and a compiler); gloo does the same work here
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    # import the model classes (and torch._dynamo, which transformers pulls in) before zero.Init:
    # it patches tensor creation, and importing torch._dynamo inside it fails
    import torch._dynamo  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401
    from cases import CASES

    wanted = [c for c in args.cases.split(",") if c]
    cases = [c for c in CASES if c.id in wanted] if wanted else model_cases(CASES)
    zero3_extra = [c for c in CASES if c.id in args.zero3_cases.split(",")]
    run_all(args.modes.split(","), lambda mode: cases + (zero3_extra if mode.startswith("zero3") else []),
            lambda case, mode: run_case(case, mode, args.out), args.out)


if __name__ == "__main__":
    main()
