"""``modules_to_save``: a trainable copy of a whole module per adapter (e.g. a classification head).

In memory the copy lives at ``<path>.modules_to_save.<adapter>.<param>``; in the checkpoint it is
``<path>.<param>``, as in PEFT.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.nn as nn

from .layer import BASE_NAME, Switchable


class ModulesToSaveWrapper(Switchable, nn.Module):
    def __init__(self, module: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: Optional[str] = None
        self.disable_adapters = False
        self._trainable = True
        self.add_adapter(adapter_name)

    def add_adapter(self, name: str) -> None:
        if name not in self.modules_to_save:
            self.modules_to_save[name] = copy.deepcopy(self.original_module)
        self._refresh_requires_grad()

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    @property
    def active_adapters(self) -> list[str]:
        """PEFT's list form of the active adapter (at most one for a modules_to_save copy)."""
        return [self.active_adapter] if self.active_adapter is not None else []

    def is_empty(self) -> bool:
        return len(self.modules_to_save) == 0

    def _select(self, names: list[str]) -> None:
        present = [n for n in names if n in self.modules_to_save]
        if len(present) > 1:
            raise ValueError(
                f"Only one adapter can be set at a time for ModulesToSaveWrapper (modules_to_save), got {len(present)}: {present}"
            )
        self.active_adapter = present[0] if present else None

    def _refresh_requires_grad(self) -> None:
        self.original_module.requires_grad_(False)
        for name, module in self.modules_to_save.items():
            module.requires_grad_(self._trainable and not self.disable_adapters and name == self.active_adapter)

    @property
    def active_module(self) -> nn.Module:
        if self.disable_adapters or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args: Any, adapter_names: Optional[list[str]] = None, **kwargs: Any) -> Any:
        if adapter_names is None or self.disable_adapters:
            return self.active_module(*args, **kwargs)
        x = args[0]
        out = None
        for name in dict.fromkeys(adapter_names):
            rows = torch.tensor([i for i, n in enumerate(adapter_names) if n == name], device=x.device)
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            part = module(x[rows], *args[1:], **kwargs)
            if out is None:
                out = part.new_empty((x.shape[0],) + part.shape[1:])
            out[rows] = part
        return out

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.active_module, name)


def _is_copyable_name(key: str, name: str) -> bool:
    return key == name or key.endswith("." + name)


def wrap_modules_to_save(model: nn.Module, names: list[str], adapter_name: str, optional: set[str]) -> list[str]:
    """Wrap (or extend) every module whose path is, or ends on a dot boundary with, one of ``names``."""
    wrapped: list[str] = []
    matched: set[str] = set()
    for key, module in list(model.named_modules()):
        if any(key.startswith(w + ".") for w in wrapped) or ".modules_to_save." in f".{key}." or key.endswith(".original_module"):
            continue
        hits = [n for n in names if _is_copyable_name(key, n)]
        if not hits:
            continue
        matched.update(hits)
        if isinstance(module, ModulesToSaveWrapper):
            module.add_adapter(adapter_name)
        else:
            if isinstance(module, (nn.ModuleDict, nn.ModuleList)) or hasattr(module, "adapters"):
                raise TypeError(f"modules_to_save cannot be applied to {key} ({type(module).__name__})")
            parent, _, child = key.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, ModulesToSaveWrapper(module, adapter_name))
        wrapped.append(key)
    missing = [n for n in names if n not in matched and n not in optional]
    if missing:
        raise ValueError(f"modules_to_save entries {missing} match no module of {type(model).__name__}")
    return wrapped


__all__ = ["ModulesToSaveWrapper", "wrap_modules_to_save", "BASE_NAME"]
