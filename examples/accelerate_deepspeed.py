"""Train a deltatune adapter with 🤗 accelerate and DeepSpeed ZeRO (stage 2 or 3).

    # two CPU processes (DeepSpeed's CPU accelerator, gloo), a tiny random Llama, nothing downloaded:
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/accelerate_deepspeed.py --cpu --zero 3 --method adalora --output out
    # ZeRO-3 with base model and adapter built inside deepspeed.zero.Init (partitioned from birth):
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/accelerate_deepspeed.py --cpu --zero 3 --zero-init --output out
    # GPUs:
    accelerate launch --num_processes 8 examples/accelerate_deepspeed.py --model Qwen/Qwen2.5-0.5B --zero 3 --output out

The DeepSpeed configuration is built here and handed to accelerate through ``DeepSpeedPlugin``, so no
``accelerate config`` file is needed. What matters for an adapter under DeepSpeed (all below):

1. Every process builds the same base model and adapter (same seed and config), as under DDP.
2. A plain ``torch.optim.AdamW`` over the adapter's parameters goes to ``accelerator.prepare``;
   ``zero_allow_untested_optimizer`` lets DeepSpeed wrap it, so no DeepSpeed C++ op is compiled.
3. ``accelerator.backward(loss)`` runs DeepSpeed's backward *and* its optimizer step (which frees the
   gradients). AdaLoRA reallocates ranks from gradients, so ``attach_adalora(model)`` wraps the
   engine's step once: gradients are read through DeepSpeed's API before the step, the allocation
   runs after it, the same on every rank; the loop itself is unchanged.
4. ``save_on_main`` gathers the ZeRO-3-partitioned adapter tensors on every rank and rank 0 alone
   writes a PEFT checkpoint that loads into a model without DeepSpeed.
5. Before saving, ``check_replicated`` (inside ``gathered_adapters`` for ZeRO-3) confirms that the
   trained adapter is bitwise equal on every rank.

On CPUs DeepSpeed's CPU accelerator (``DS_ACCELERATOR=cpu``) would JIT-compile a shared-memory
all-reduce kernel when its process group starts; ``--cpu`` turns that off and gloo does the work.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, set_seed
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accelerate_train import CONFIGS, build_model, counting_sequences, training_parser  # noqa: E402  (shared with that example)

import deltatune as dt  # noqa: E402
from deltatune.integrations.deepspeed import attach_adalora  # noqa: E402
from deltatune.integrations.distributed import check_replicated, gathered_adapters, save_on_main  # noqa: E402


def deepspeed_config(args: argparse.Namespace) -> dict:
    zero: dict = {"stage": args.zero}
    if args.zero == 3 and args.cpu:
        zero["stage3_param_persistence_threshold"] = 0  # partition even the tiny model's tensors
    return {
        "train_micro_batch_size_per_gpu": args.batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # a torch optimizer: nothing to compile
        "steps_per_print": 10**9,
    }


def zero_init(config: dict, model: str | None = None):
    """``deepspeed.zero.Init``: parameters are partitioned as the modules are built. Import the model
    classes (and ``torch._dynamo``, which transformers pulls in lazily) first: zero.Init patches tensor
    creation, and importing them inside it fails."""
    import deepspeed
    import torch._dynamo  # noqa: F401
    from transformers import AutoConfig, LlamaForCausalLM  # noqa: F401
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if model is not None:
        MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(model))]  # imports the model's class
    return deepspeed.zero.Init(config_dict_or_path=config)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = training_parser(__doc__, steps=10, batch_size=4,
                        cpu_help="DeepSpeed's CPU accelerator with gloo (set DS_ACCELERATOR=cpu)")
    p.add_argument("--zero", type=int, choices=(2, 3), default=2, help="ZeRO stage")
    p.add_argument("--zero-init", action="store_true", help="build base and adapter inside deepspeed.zero.Init (ZeRO-3)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.zero_init and args.zero != 3:
        raise SystemExit("--zero-init needs --zero 3")
    if args.cpu:
        import deepspeed  # noqa: F401  (registers deepspeed.comm.torch)

        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # no JIT-compiled shm kernel; gloo instead
    config = deepspeed_config(args)
    # on CPUs accelerate finds no device backend for DeepSpeed by itself (it would count one process)
    handlers = [InitProcessGroupKwargs(backend="gloo")] if args.cpu else []
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config), kwargs_handlers=handlers)
    set_seed(args.seed)  # 1. the same base model and adapter on every process

    with zero_init(config, args.model) if args.zero_init else contextlib.nullcontext():
        model = dt.get_peft_model(build_model(args.model, args.seed), CONFIGS[args.method](args))
    check_replicated(model)
    if accelerator.is_main_process and not args.zero_init:  # zero.Init's partitioned tensors report numel() 0
        model.print_trainable_parameters()

    vocab = 64 if args.model is None else model.get_base_model().config.vocab_size
    data = counting_sequences(16 * args.batch_size * accelerator.num_processes, 16, min(vocab, 64), seed=args.seed)
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)  # 2.
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)  # model: a DeepSpeedEngine
    if args.method == "adalora":
        attach_adalora(model)  # 3. allocation at every optimizer step, inside accelerator.backward

    model.train()
    losses: list[float] = []
    step = 0
    while step < args.steps:
        for batch in loader:
            loss = model(input_ids=batch, labels=batch).loss
            accelerator.backward(loss)  # DeepSpeed: backward + optimizer step (+ AdaLoRA's allocation)
            optimizer.step()  # no-ops under DeepSpeed; kept so the loop also runs without it
            optimizer.zero_grad()
            losses.append(accelerator.gather(loss.detach()[None]).mean().item())
            accelerator.print(f"step {step:3d}  loss {losses[-1]:.4f}")
            step += 1
            if step == args.steps:
                break

    with gathered_adapters(model):  # 5. the same adapter on every rank
        check_replicated(model, parameters=True, names=[n for n, p in model.named_parameters() if p.requires_grad])
    save_on_main(model, args.output)  # 4. ZeRO-3 tensors gathered; rank 0 writes, every rank waits
    log = {"method": args.method, "zero": args.zero, "zero_init": args.zero_init,
           "processes": accelerator.num_processes, "losses": losses}
    if accelerator.is_main_process:
        with open(os.path.join(args.output, "train_log.json"), "w") as f:
            json.dump(log, f)
        print(f"saved the {args.method} adapter to {args.output}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return log


if __name__ == "__main__":
    main()
