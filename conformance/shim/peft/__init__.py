"""A stand-in ``peft`` package: PEFT's public names for FourierFT, RandLoRA, AdaLoRA, Bone and MiSS
come from deltatune; everything else comes from the real PEFT (other methods, test utilities).

How it works (no monkeypatching of PEFT or transformers): the real PEFT is imported once and its
modules are renamed in ``sys.modules`` to ``_peft_real.*``; then every ``peft.<module>`` import is
answered by a proxy module whose attributes are looked up first in deltatune's table
(``conformance/shim/_deltatune_map.py``), then in the real module. Inside the modules of the five
methods themselves (``peft.tuners.fourierft.layer`` ...), a name deltatune does not provide raises
``ImportError``/``AttributeError`` naming it as a PEFT internal, instead of quietly giving the
real PEFT's class.
"""

import importlib
import importlib.abc
import importlib.util
import os
import sys
import types

_SHIM_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_REAL = "_peft_real"


def _load_real_peft():
    here = sys.modules.pop("peft")
    saved_path = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _SHIM_DIR]
    try:
        real = importlib.import_module("peft")
    finally:
        sys.path[:] = saved_path
    for name in [n for n in sys.modules if n == "peft" or n.startswith("peft.")]:
        sys.modules[_REAL + name[4:]] = sys.modules.pop(name)
    sys.modules["peft"] = here
    return real


_real = _load_real_peft()
sys.path.insert(0, _SHIM_DIR)
import _deltatune_map as _map  # noqa: E402


class _Proxy(types.ModuleType):
    """``peft.<module>``: deltatune's object where the table names one, else the real module's."""

    def __getattr__(self, name):
        table = _map.overrides(self.__name__)
        if name in table:
            return table[name]
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        if _map.is_method_module(self.__name__):
            raise AttributeError(
                f"deltatune does not provide {self.__name__}.{name} (a PEFT internal of a method deltatune implements)"
            )
        real = _real_module(self.__name__)
        try:
            return _wrap(getattr(real, name))
        except AttributeError:
            # a submodule not imported yet
            try:
                return importlib.import_module(f"{self.__name__}.{name}")
            except ImportError:
                raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}") from None

    def __dir__(self):
        names = set(_map.overrides(self.__name__))
        if not _map.is_method_module(self.__name__):
            names |= set(dir(_real_module(self.__name__)))
        return sorted(names)


def _wrap(value):
    """A real PEFT module reached as an attribute is handed out as its ``peft.*`` proxy."""
    if isinstance(value, types.ModuleType) and value.__name__.startswith(_REAL):
        return importlib.import_module("peft" + value.__name__[len(_REAL):])
    return value


def _real_module(name):
    real_name = _REAL + name[4:]
    if real_name in sys.modules:
        return sys.modules[real_name]
    parent = _real_module(name.rpartition(".")[0]) if "." in name else None
    paths = getattr(parent, "__path__", None)
    spec = importlib.machinery.PathFinder.find_spec(real_name, paths)
    if spec is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[real_name] = module
    spec.loader.exec_module(module)
    return module


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if not fullname.startswith("peft."):
            return None
        try:
            real = _real_module(fullname)
        except ModuleNotFoundError:
            if _map.provides_module(fullname):
                real = None
            else:
                return None
        spec = importlib.util.spec_from_loader(fullname, self, is_package=hasattr(real, "__path__"))
        return spec

    def create_module(self, spec):
        module = _Proxy(spec.name)
        real = sys.modules.get(_REAL + spec.name[4:])
        if real is not None and hasattr(real, "__path__"):
            module.__path__ = []
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Finder())


def __getattr__(name):
    table = _map.overrides("peft")
    if name in table:
        return table[name]
    try:
        return _wrap(getattr(_real, name))
    except AttributeError:
        return importlib.import_module(f"peft.{name}")


__version__ = _real.__version__
__all__ = list(_real.__all__)
