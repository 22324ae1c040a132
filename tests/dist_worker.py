"""One torchrun worker that trains every selected method case under DDP and then FSDP2 (gloo, CPU).

    python -m torch.distributed.run --nproc_per_node 2 --master_port P tests/dist_worker.py \
        --out DIR --cases bone-lin0,adalora-lin0 --modes ddp,fsdp

A single launch loops over the cases (a launch costs seconds of imports; a case costs well under
one). Rank 0 writes ``DIR/results.json`` after every case: ``{mode: {case id: [rank 0, rank 1]}}``
where each entry holds what that rank measured; tests/test_distributed.py asserts on it. Errors are
recorded per case, not raised, so one broken method does not hide the others.

Also imported by the tests (``representative`` picks the cases both files use).
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from worker_loop import run_all, save_counting_writes  # noqa: E402

STEPS = 4  # optimizer steps per case: AdaLoRA (total_step=10 in its cases) prunes from step 0
DEVICE = os.environ.get("DELTATUNE_DIST_DEVICE", "cpu")  # "cuda": NCCL, one GPU per rank


def representative(cases, kinds=("mlp", "conv", "gpt2", "llama")):
    """The first case of every (variant, model) pair, variant = the case id's prefix (bone, bat,
    adalora, fourierft, randlora, …): every method and every layer type, without repeats."""
    seen, out = set(), []
    for case in cases:
        key = (case.id.split("-")[0], case.model)
        if case.model in kinds and key not in seen:
            seen.add(key)
            out.append(case)
    return out


def make_batch(kind, rank, step, device="cpu"):
    """Different data on every rank and step (so unsynchronised training would diverge)."""
    import torch

    g = torch.Generator().manual_seed(1000 * step + rank)
    if kind == "mlp":
        batch = {"x": torch.randn(4, 10, generator=g)}
    elif kind == "conv":
        batch = {"x": torch.randn(2, 3, 6, 6, generator=g)}
    else:
        ids = torch.randint(0, 64, (2, 8), generator=g)
        batch = {"input_ids": ids, "labels": ids}
    return {k: v.to(device) for k, v in batch.items()}


def loss_of(out):
    loss = getattr(out, "loss", None)
    if loss is not None:
        return loss
    out = out.logits if hasattr(out, "logits") else out
    return out.float().pow(2).mean()


def _full(t):
    from deltatune.integrations.distributed import is_sharded

    t = t.detach()
    return (t.full_tensor() if is_sharded(t) else t).cpu().clone()


def run_case(case, mode, out_dir, ddp_reference):
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import deltatune as dt
    from conftest import build, out_of
    from deltatune.integrations import distributed as dd

    rank = dist.get_rank()
    info = {"rank": rank}
    device = torch.device(DEVICE, torch.cuda.current_device()) if DEVICE == "cuda" else torch.device("cpu")
    base, inputs = build(case.model)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    model = dt.get_peft_model(base.to(device), case.config())
    tuner = model.base_model
    ada = type(tuner).__name__ == "AdaLoraModel"
    model.train()
    dd.check_replicated(model)
    aliases = dd.buffer_aliases(model)
    info["aliases"] = [list(a) for a in aliases]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    if mode == "ddp":
        # frozen buffers were checked equal above; broadcasting them every step (the default) is wasted work
        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    else:
        dd.fully_shard_model(model)  # AdaLoRA: adapters replicated (it has update_and_allocate)
        wrapped = model
        info["aliases_after"] = [list(a) for a in dd.buffer_aliases(model)]
        info["sharded_buffers"] = [n for n, b in model.named_buffers(remove_duplicate=False) if dd.is_sharded(b)]
        info["sharded_adapter_params"] = sum(dd.is_sharded(p) for n, p in model.named_parameters() if n in init)
        info["inference_cache_on"] = any(getattr(m, "inference_cache", False) for m in model.modules() if isinstance(m, dt.AdapterLayer))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    torch.manual_seed(100 + rank)  # dropout masks: the same in both modes, different per rank
    losses = []
    for step in range(STEPS):
        loss = loss_of(wrapped(**make_batch(case.model, rank, step, device)))
        loss.backward()
        opt.step()
        if ada:
            tuner.update_and_allocate(step)
        opt.zero_grad()
        losses.append(float(loss))
    info["losses"] = losses
    final = {n: _full(p) for n, p in model.named_parameters() if n in init}
    flat = torch.cat([final[n].float().flatten() for n in names])
    info["digest"] = dd._digest(flat)
    info["changed"] = max(float((final[n].float() - init[n].float()).abs().max()) for n in names)
    dd.check_replicated(model)  # frozen buffers still equal after training
    info["buffers_replicated"] = True
    if ada:
        info["rank_pattern"] = tuner.peft_config["default"].rank_pattern
    if mode == "ddp":
        ddp_reference[case.id] = final
    else:
        ref = ddp_reference.get(case.id)
        info["vs_ddp"] = None if ref is None else max(float((final[n] - ref[n]).abs().max()) for n in names)
        try:
            model.merge_adapter()
            info["merge_error"] = None
        except Exception as exc:  # noqa: BLE001 - the message is what the test checks
            info["merge_error"] = f"{type(exc).__name__}: {exc}"

    # save once (rank 0), load everywhere, compare outputs in eval mode
    folder = os.path.join(out_dir, mode, case.id)
    info.update(save_counting_writes(wrapped, folder))
    model.eval()
    with torch.no_grad():
        trained = out_of(wrapped, inputs).float()
    fresh, _ = build(case.model)
    loaded = dt.PeftModel.from_pretrained(fresh.to(device), folder)
    with torch.no_grad():
        info["load_diff"] = float((out_of(loaded, inputs).float() - trained).abs().max())

    # a buffer that differs on one rank is caught, and broadcasting repairs it
    adapter_buffers = [n for n, b in model.named_buffers() if ".adapters." in n or not n.startswith("base_model.model.")]
    if adapter_buffers:
        name = adapter_buffers[0]
        buf = model.get_buffer(name)
        if rank == 1:
            with torch.no_grad():
                buf.add_(1)
        try:
            dd.check_replicated(model)
            info["mismatch_caught"] = False
        except RuntimeError as exc:
            info["mismatch_caught"] = name in str(exc)
        dd.broadcast_buffers(model)
        dd.check_replicated(model)
        info["mismatch_buffer"] = name
    return info


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", default="")
    parser.add_argument("--modes", default="ddp,fsdp")
    args = parser.parse_args()

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if DEVICE == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo", timeout=timedelta(seconds=60))
    import warnings

    warnings.simplefilter("ignore")
    from cases import CASES

    wanted = [c for c in args.cases.split(",") if c]
    cases = [c for c in CASES if c.id in wanted] if wanted else representative(CASES)
    reference: dict = {}
    run_all(args.modes.split(","), lambda mode: cases, lambda case, mode: run_case(case, mode, args.out, reference),
            args.out)


if __name__ == "__main__":
    main()
