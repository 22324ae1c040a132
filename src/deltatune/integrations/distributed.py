"""Data-parallel training with deltatune adapters: DDP, FSDP2 (``fully_shard``) and accelerate.

    import deltatune.integrations.distributed as dist_dt

    model = dt.get_peft_model(base, config)
    dist_dt.check_replicated(model)              # frozen buffers (bases, positions) equal on every rank
    ddp = DistributedDataParallel(model, broadcast_buffers=False)  # or: dist_dt.fully_shard_model(model)
    ... train ...
    dist_dt.save_on_main(ddp, "out")             # rank 0 writes, every rank waits

What holds, and why:

* An adapter is plain ``nn.Parameter``s and registered buffers, so DDP and FSDP need nothing
  special for the trainable part. The frozen random state of a method (FourierFT's frequency
  positions, RandLoRA's shared bases) lives in buffers: seeded, so every rank builds the same
  values, and :func:`check_replicated` proves it (a different seed on one rank gives different
  adapters that no gradient all-reduce would ever notice). :func:`broadcast_buffers` repairs it.
* FSDP2 shards parameters only; buffers stay plain, replicated tensors. :func:`fully_shard_model`
  applies ``fully_shard`` to whole blocks (transformers' ``_no_split_modules``, else each
  :class:`~deltatune.core.layer.AdapterLayer`) and then the root, never to a ``base_layer`` alone
  or inside a delta: an ``AdapterLayer`` reads ``base_layer.weight`` outside the base layer's own
  forward (weight transforms such as BAT) and deltas are called through ``delta_out``, not
  ``forward``, so FSDP's unshard hooks would not run for them. It also checks that a buffer
  registered under several names (RandLoRA's model-level bases: one holder, registered under the
  name of every adapter that shares it)
  still shares one storage after wrapping: nothing was sharded or copied.
* ``replicate_adapters=True`` keeps the adapter's parameters whole on every rank (FSDP's
  ``ignored_params``) and averages their gradients with one all-reduce per tensor during backward:
  the frozen base is sharded, the small adapter is data-parallel. AdaLoRA's rank allocator needs
  it under FSDP, since it reads whole gradients and masks whole tensors; the default turns it on
  for methods with an ``update_and_allocate`` step.
* Merging writes the base weight; a sharded (DTensor) weight cannot be merged in place (the core
  raises a clear error). Save the adapter, then merge it into an unsharded model. For the same
  reason :func:`fully_shard_model` turns off the layers' inference cache (a merged weight copy).
* DDP: pass ``broadcast_buffers=False`` once :func:`check_replicated` passed. The default
  broadcasts every buffer from rank 0 before each forward, RandLoRA's bases included (they can be
  the largest tensors of the adapter) although they never change.

This module imports only ``torch``; nothing here runs unless called.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
import torch.nn as nn

from ..core.layer import AdapterLayer, is_sharded_tensor
from ..core.modules_to_save import ModulesToSaveWrapper
from ..core.tuner import AdapterModel, find_tuner, peel

__all__ = [
    "barrier", "broadcast_buffers", "buffer_aliases", "check_replicated", "fully_shard_model",
    "gathered_adapters", "is_main_process", "is_sharded", "rank", "save_on_main", "unwrap_model", "world_size",
]


# ---------------------------------------------------------------------------------------- process group
def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """This process's global rank (0 when no process group is initialized)."""
    return torch.distributed.get_rank() if _initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if _initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if _initialized():
        torch.distributed.barrier()


# ---------------------------------------------------------------------------------------- unwrapping
def unwrap_model(model: nn.Module) -> nn.Module:
    """The deltatune model inside DDP or a DeepSpeed engine (``.module``), ``torch.compile``
    (``._orig_mod``) or accelerate wrappers: the first ``PeftModel`` or :class:`AdapterModel` found, else the innermost module."""
    from ..peft_model import PeftModel

    layers = list(peel(model))
    return next((m for m in layers if isinstance(m, (PeftModel, AdapterModel))), layers[-1])


is_sharded = is_sharded_tensor


# ---------------------------------------------------------------------------------------- replicated state
def _all_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every buffer under every name it is registered as (a shared buffer appears several times)."""
    return [(n, b) for n, b in model.named_buffers(remove_duplicate=False) if b is not None]


def buffer_aliases(model: nn.Module) -> list[tuple[str, ...]]:
    """Names that share one buffer storage (RandLoRA's bases, shared by the model's adapters)."""
    groups: dict[tuple[Any, int], list[str]] = {}
    for name, buf in _all_buffers(model):
        if buf.device.type == "meta":
            continue
        key = (buf.untyped_storage().data_ptr(), buf.storage_offset())
        groups.setdefault(key, []).append(name)
    return sorted(tuple(names) for names in groups.values() if len(names) > 1)


def _digest(t: torch.Tensor) -> str:
    t = t.detach()
    if is_sharded(t):
        t = t.to_local()  # each rank's own shard; sharded tensors are compared shard by shard
    data = t.to("cpu").contiguous()
    if data.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the raw bits
        data = data.view(torch.int16)
    return hashlib.sha1(data.numpy().tobytes()).hexdigest() + str(tuple(t.shape)) + str(t.dtype)


def check_replicated(model: nn.Module, parameters: bool = False, names: Optional[Iterable[str]] = None) -> None:
    """Raise unless every buffer (and with ``parameters=True`` every parameter) is bitwise equal on
    all ranks. Collective: every rank must call it. Buffers include the non-persistent ones that a
    checkpoint does not carry (FourierFT positions, RandLoRA bases), which is the point."""
    if not _initialized():
        return
    tensors = dict(_all_buffers(model))
    if parameters:
        tensors.update(model.named_parameters())
    if names is not None:
        wanted = set(names)
        tensors = {k: v for k, v in tensors.items() if k in wanted}
    mine = {k: _digest(v) for k, v in sorted(tensors.items())}
    every: list[Optional[dict[str, str]]] = [None] * world_size()
    torch.distributed.all_gather_object(every, mine)
    bad = sorted(
        k for k in set().union(*(d.keys() for d in every if d)) if len({(d or {}).get(k) for d in every}) > 1
    )
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise RuntimeError(
            f"Tensors differ between ranks: {shown}. Every rank must build the adapter from the same config and "
            "seed (FourierFT's random_loc_seed, RandLoRA's projection_prng_key); broadcast_buffers(model) copies "
            "rank 0's buffers to all ranks."
        )


@torch.no_grad()
def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers to every rank, in place (shared buffers stay shared)."""
    if not _initialized():
        return
    done: set[int] = set()
    for _, buf in _all_buffers(model):
        if id(buf) in done or is_sharded(buf):
            continue
        done.add(id(buf))
        torch.distributed.broadcast(buf, src=src)


# ---------------------------------------------------------------------------------------- saving
def _adapter_parameters(tuner: AdapterModel) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """(owner, attribute, parameter) of every tensor an adapter checkpoint may hold, in module order."""
    from ..io.state_dict import adapter_slots

    seen: set[int] = set()
    out = []
    for name in tuner.peft_config:
        for owner, attr in adapter_slots(tuner, name).values():
            param = owner._parameters.get(attr)
            if param is not None and id(param) not in seen:
                seen.add(id(param))
                out.append((owner, attr, param))
    return out


@contextlib.contextmanager
def gathered_adapters(model: nn.Module) -> Iterator[None]:
    """Inside the block every adapter tensor sharded by FSDP or partitioned by DeepSpeed ZeRO-3 is a
    whole tensor (gathered from all ranks); the sharded parameters come back afterwards. Only adapter
    tensors are gathered, not the base weights. Collective: every rank must enter it. Read-only:
    changes inside are dropped."""
    slots = _adapter_parameters(find_tuner(model))
    zero3 = [param for _, _, param in slots if hasattr(param, "ds_id")]  # DeepSpeed ZeRO-3 partitions
    with contextlib.ExitStack() as stack:
        if zero3:
            import deepspeed

            stack.enter_context(deepspeed.zero.GatheredParameters(zero3, modifier_rank=None))
        with _gathered_fsdp(slots):
            yield


@contextlib.contextmanager
def _gathered_fsdp(slots: list[tuple[nn.Module, str, nn.Parameter]]) -> Iterator[None]:
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for owner, attr, param in slots:
            if is_sharded(param):
                full = param.detach().full_tensor()  # all-gather, in the same order on every rank
                owner._parameters[attr] = nn.Parameter(full, requires_grad=param.requires_grad)
                swapped.append((owner, attr, param))
        yield
    finally:
        for owner, attr, param in swapped:
            owner._parameters[attr] = param


def save_on_main(model: nn.Module, save_directory: str | os.PathLike, **kwargs: Any) -> bool:
    """``save_pretrained`` on rank 0 only, for a model wrapped in DDP, FSDP2, ``torch.compile`` or
    accelerate, or a DeepSpeed engine; adapter tensors sharded by FSDP or ZeRO-3 are gathered first. Every rank must call it; all of
    them return after the files exist. Returns whether this rank wrote."""
    inner = unwrap_model(model)
    if not hasattr(inner, "save_pretrained"):
        raise TypeError(f"{type(inner).__name__} has no save_pretrained; wrap the model with deltatune.get_peft_model")
    main = is_main_process()
    with gathered_adapters(inner):
        if main:
            inner.save_pretrained(save_directory, is_main_process=True, **kwargs)
    barrier()
    return main


# ---------------------------------------------------------------------------------------- FSDP2
def _default_blocks(root: nn.Module) -> list[nn.Module]:
    """transformers' ``_no_split_modules`` blocks if the model names any, else each outermost
    AdapterLayer / ModulesToSaveWrapper."""
    names: set[str] = set()
    for m in root.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    blocks = [m for m in root.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    wrappers = [m for m in root.modules() if isinstance(m, (AdapterLayer, ModulesToSaveWrapper))]
    inside = {id(sub) for w in wrappers for sub in w.modules() if sub is not w}
    return [w for w in wrappers if id(w) not in inside]


def _check_block(root: nn.Module, block: nn.Module) -> None:
    for path, module in root.named_modules():
        if isinstance(module, AdapterLayer):
            for sub_path, sub in module.named_modules():
                if sub is block and sub is not module:
                    raise ValueError(
                        f"fully_shard_model: '{path}.{sub_path}' lies inside an AdapterLayer; shard the AdapterLayer "
                        f"'{path}' or a block that contains it (the layer reads base_layer.weight outside the base "
                        "layer's forward, and deltas run through delta_out, which FSDP's hooks do not see)"
                    )


def _average_grad_hook(group: Any, size: int):
    def hook(param: torch.Tensor) -> None:
        if param.grad is not None:
            torch.distributed.all_reduce(param.grad, group=group)
            param.grad.div_(size)

    return hook


def fully_shard_model(
    model: nn.Module,
    *,
    blocks: Optional[Sequence[nn.Module]] = None,
    replicate_adapters: Optional[bool] = None,
    mesh: Any = None,
    **fsdp_kwargs: Any,
) -> nn.Module:
    """Apply FSDP2's ``fully_shard`` to ``blocks`` (default: see :func:`_default_blocks`), then to
    the whole model, and return it (FSDP2 changes modules in place).

    ``replicate_adapters``: keep adapter parameters (those that require grad) unsharded on every
    rank and average their gradients across the mesh in backward. ``None`` (default) turns it on
    when the method reallocates during training (its model has ``update_and_allocate``: AdaLoRA's
    allocator reads whole gradients and masks whole tensors, which sharded DTensors refuse).
    Buffers are never sharded; the check at the end proves that buffers which shared one storage
    before (RandLoRA's model-level bases) still do. ``fsdp_kwargs`` go to ``fully_shard``.
    """
    from torch.distributed.fsdp import fully_shard

    if not _initialized():
        raise RuntimeError("fully_shard_model needs an initialized process group (torch.distributed.init_process_group)")
    root = unwrap_model(model)
    before = buffer_aliases(root)
    chosen = list(blocks) if blocks is not None else _default_blocks(root)
    for block in chosen:
        _check_block(root, block)
    if mesh is not None:
        fsdp_kwargs["mesh"] = mesh
    if replicate_adapters is None:
        replicate_adapters = callable(getattr(find_tuner(root), "update_and_allocate", None))
    ignored: set[nn.Parameter] = set()
    if replicate_adapters:
        ignored = {p for p in root.parameters() if p.requires_grad}
        fsdp_kwargs["ignored_params"] = ignored
    order = {id(m): i for i, m in enumerate(root.modules())}
    for block in sorted(chosen, key=lambda m: -order.get(id(m), -1)):  # innermost first
        if block is not root:
            fully_shard(block, **fsdp_kwargs)
    fully_shard(root, **fsdp_kwargs)
    if ignored:
        group = mesh.get_group() if mesh is not None else None
        device = next((p.device for p in root.parameters() if p not in ignored), None)
        size = torch.distributed.get_world_size(group)
        for p in ignored:
            if device is not None and p.device != device:
                p.data = p.data.to(device)  # FSDP does not move ignored parameters
            p.register_post_accumulate_grad_hook(_average_grad_hook(group, size))
    for layer in root.modules():
        if isinstance(layer, AdapterLayer) and hasattr(layer, "inference_cache"):
            # the inference cache keeps a whole merged weight per layer after FSDP reshards: it
            # would undo the sharding (and it is rebuilt every call: the unsharded tensor is new)
            layer.inference_cache = False
            layer._cache = None
    after = buffer_aliases(root)
    if after != before:
        raise RuntimeError(f"fully_shard_model: shared buffers were split while sharding: before {before}, after {after}")
    sharded = [n for n, b in _all_buffers(root) if is_sharded(b)]
    if sharded:
        raise RuntimeError(f"fully_shard_model: buffers were sharded: {sharded}")
    return model
