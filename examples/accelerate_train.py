"""Train a deltatune adapter with 🤗 accelerate: one script for one process, DDP on CPUs or GPUs.

    # two CPU processes (gloo), a tiny random Llama, nothing downloaded:
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_train.py --cpu --method adalora --output out
    # one process:
    python examples/accelerate_train.py --cpu --method bone --output out
    # a real model on the GPUs accelerate was configured for:
    accelerate launch examples/accelerate_train.py --model Qwen/Qwen2.5-0.5B --method randlora --output out

What matters for an adapter under accelerate (all below, in order):

1. Every process builds the same base model and adapter (same seed and config): the frozen random
   state of FourierFT (positions) and RandLoRA (bases) is drawn from the config's seed, and
   ``check_replicated`` proves the ranks agree before training (a mismatch would never be noticed
   by the gradient all-reduce).
2. ``accelerator.prepare`` wraps the model in DDP; only the adapter's parameters require grad, so
   only they are all-reduced.
3. AdaLoRA reallocates ranks after each optimizer step, from gradients that DDP has already
   averaged, so every rank computes the same rank pattern. ``unwrap_model`` reaches the adapter
   model through the DDP wrapper.
4. The main process alone writes the checkpoint (PEFT format); the others wait for it.

Several CPU processes: ``accelerate launch --cpu --num_processes 2`` starts them through
``mpirun`` only; ``--multi_gpu`` uses torchrun, and the script's ``--cpu`` (``Accelerator(cpu=True)``)
makes accelerate pick DDP over gloo. ``torchrun --nproc_per_node 2 examples/accelerate_train.py
--cpu ...`` works too.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

import deltatune as dt
from deltatune.integrations.distributed import check_replicated, unwrap_model

TARGETS = ["q_proj", "v_proj"]

# one line per method: the config that trains it here (PEFT's field names and defaults otherwise)
CONFIGS: dict[str, Callable[[argparse.Namespace], dt.TunerConfig]] = {
    "bone": lambda a: dt.BoneConfig(r=4, target_modules=TARGETS, task_type="CAUSAL_LM"),
    "bat": lambda a: dt.BoneConfig(r=4, init_weights="bat", target_modules=TARGETS, task_type="CAUSAL_LM"),
    "miss": lambda a: dt.MissConfig(r=4, init_weights="mini", mini_r=2, target_modules=TARGETS, task_type="CAUSAL_LM"),
    "adalora": lambda a: dt.AdaLoraConfig(
        init_r=6, target_r=2, total_step=a.steps, target_modules=TARGETS, task_type="CAUSAL_LM"
    ),
    "fourierft": lambda a: dt.FourierFTConfig(n_frequency=64, target_modules=TARGETS, task_type="CAUSAL_LM"),
    "randlora": lambda a: dt.RandLoraConfig(r=4, target_modules=TARGETS, task_type="CAUSAL_LM"),
}


def build_model(name: str | None, seed: int = 0) -> torch.nn.Module:
    """A pretrained causal LM, or (``name`` None) a tiny random Llama built from a config."""
    import transformers

    if name:
        return transformers.AutoModelForCausalLM.from_pretrained(name)
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config)


def counting_sequences(n: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Sequences a, a+b, a+2b, … (mod vocab): a pattern an adapter learns in a few steps."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    return (start + step * torch.arange(length)) % vocab  # (n, length)


def training_parser(doc: str, steps: int, batch_size: int, cpu_help: str) -> argparse.ArgumentParser:
    """The options both accelerate examples take (method, model, schedule, output)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=sorted(CONFIGS), default="bone")
    p.add_argument("--model", default=None, help="a pretrained causal LM (default: a tiny random Llama)")
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    p.add_argument("--batch_size", type=int, default=batch_size, help="per process")
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help=cpu_help)
    p.add_argument("--output", required=True)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return training_parser(__doc__, steps=20, batch_size=8, cpu_help="train on CPU (gloo between processes)").parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    accelerator = Accelerator(cpu=args.cpu)
    set_seed(args.seed)  # 1. the same base model and adapter on every process
    model = dt.get_peft_model(build_model(args.model, args.seed), CONFIGS[args.method](args))
    check_replicated(model)
    if accelerator.is_main_process:
        model.print_trainable_parameters()

    vocab = model.get_base_model().config.vocab_size
    data = counting_sequences(64 * accelerator.num_processes, 16, min(vocab, 64), seed=args.seed)
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)  # 2. DDP when launched on >1 process
    tuner = unwrap_model(model).base_model  # the <Method>Model inside DDP
    allocate = getattr(tuner, "update_and_allocate", None)  # AdaLoRA only

    model.train()
    losses: list[float] = []
    step = 0
    while step < args.steps:
        for batch in loader:
            loss = model(input_ids=batch, labels=batch).loss
            accelerator.backward(loss)
            optimizer.step()
            if allocate is not None:
                allocate(step)  # 3. after the step, before zero_grad: reads the averaged gradients
            optimizer.zero_grad()
            losses.append(accelerator.gather(loss.detach()[None]).mean().item())
            accelerator.print(f"step {step:3d}  loss {losses[-1]:.4f}")
            step += 1
            if step == args.steps:
                break

    # 4. one writer; every process returns once the files exist
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(args.output, is_main_process=accelerator.is_main_process)
    log = {"method": args.method, "processes": accelerator.num_processes, "losses": losses}
    if accelerator.is_main_process:
        with open(os.path.join(args.output, "train_log.json"), "w") as f:
            json.dump(log, f)
        print(f"saved the {args.method} adapter to {args.output}")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # tears the process group down cleanly before the interpreter exits
    return log


if __name__ == "__main__":
    main()
