"""The model a run trains: deltatune's adapter, the real PEFT's (``--peft``), or the head alone.

The translation to PEFT lives here only: a deltatune config becomes the PEFT config its saved
``adapter_config.json`` describes (the io layer's format: Bone is written as MiSS), and AdaLoRA's
rank allocation is driven the way each library expects it.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from .options import MethodSpec, UsageError

HEAD_MODULES = ("classifier", "score")  # what PEFT's SEQ_CLS wrapper trains and saves with the adapter


def peft_config_for(config: Any) -> Any:
    """The real PEFT's config for one of ours: the ``adapter_config.json`` deltatune would write
    (:func:`deltatune.io.formats.export_checkpoint`: Bone as PEFT's MiSS, its successor with the
    same maths), read by PEFT's config class of that ``peft_type``."""
    import dataclasses

    import peft

    from deltatune.io.formats import export_checkpoint

    data = {k: (sorted(v) if isinstance(v, set) else v) for k, v in export_checkpoint(config.to_dict(), {})[0].items()}
    data["peft_type"] = str(getattr(data["peft_type"], "value", data["peft_type"]))
    data.pop("peft_version", None)
    config_cls = peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING[data["peft_type"]]
    names = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in data.items() if k in names})


def check_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise UsageError("--peft needs the peft package: pip install peft==0.21.2") from None


def wrap_model(model: Any, spec: MethodSpec, config: Any, use_peft: bool) -> Any:
    """The model to train: adapter-wrapped (deltatune or PEFT), or the base with only its head trainable."""
    if spec.is_head:
        heads = [n for n in HEAD_MODULES if hasattr(model, n)]
        if not heads:
            raise UsageError("method 'head' trains the classification head, but the model has none (classifier/score)")
        for name, p in model.named_parameters():
            p.requires_grad_(name.split(".")[0] in heads)
        return model
    if use_peft:
        import peft

        return peft.get_peft_model(model, peft_config_for(config))
    import deltatune as dt

    return dt.get_peft_model(model, config)


def param_groups(model: Any, lr: float, head_lr: float, weight_decay: float) -> list[dict]:
    """The adapter's parameters at ``lr``, the head's (``modules_to_save``) at ``head_lr``."""
    adapter, head = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = ".modules_to_save." in name or name.split(".")[0] in HEAD_MODULES
        (head if is_head else adapter).append(p)
    groups = []
    if adapter:
        groups.append({"params": adapter, "lr": lr, "weight_decay": weight_decay, "name": "adapter"})
    if head:
        groups.append({"params": head, "lr": head_lr, "weight_decay": weight_decay, "name": "head"})
    if not groups:
        raise UsageError("nothing to train: the model has no trainable parameter")
    return groups


def after_step_hook(model: Any, optimizer: Any) -> Optional[Callable[[int], None]]:
    """What must run after each optimizer step, before the gradients are cleared (AdaLoRA's allocation).

    deltatune's adapter models that need it offer ``attach_optimizer`` (the work then runs inside
    ``optimizer.step()``, nothing to return); PEFT's AdaLoRA needs ``update_and_allocate(step)``.
    """
    tuner = getattr(model, "base_model", None)
    if tuner is None or tuner is model:
        return None
    if getattr(type(tuner), "attach_optimizer", None) is not None:
        tuner.attach_optimizer(optimizer)
        return None
    if getattr(type(tuner), "update_and_allocate", None) is not None:
        return tuner.update_and_allocate
    return None


def save_adapter(model: Any, spec: MethodSpec, out: Any, head_file: str) -> list[str]:
    """Write the adapter (PEFT format) or, for ``head``, the head's weights; returns the weight files."""
    from deltatune.io.files import ensure_dir, save_tensors

    ensure_dir(out)
    if spec.is_head:
        tensors = {k: v for k, v in model.state_dict().items() if k.split(".")[0] in HEAD_MODULES}
        save_tensors(tensors, out / head_file)
        return [head_file]
    model.save_pretrained(str(out))
    return ["adapter_model.safetensors", "adapter_model.bin"]
