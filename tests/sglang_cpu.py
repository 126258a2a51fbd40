"""Import SGLang 0.5.23's own code on a CPU machine (the contract tests run it in CI).

`make test` installs the pinned sglang and sglang-router wheels without their GPU dependencies
(Makefile, tests/requirements-sglang-cpu.txt). What still cannot be installed next to a CPU
torch is stubbed here, and only that: torchvision (PyPI's builds need a CUDA torch; SGLang's
multimodal processors import it at module level and the code under test never calls it).
transformers decides whether torchvision exists when it is first imported, so it is imported
before the stub is installed and keeps treating torchvision as absent.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

HAS_SGLANG = importlib.util.find_spec("sglang") is not None
_STUBBED = ("torchvision",)


class _Anything(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return cls


class _Placeholder(metaclass=_Anything):
    def __init__(self, *a, **k):
        pass


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in _STUBBED:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StubModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []


def prepare() -> None:
    """Make `import sglang.srt...` work on this machine (a no-op where torchvision is real)."""
    if any(isinstance(f, _StubFinder) for f in sys.meta_path):
        return
    try:
        import torchvision  # noqa: F401
        return
    except Exception:  # noqa: BLE001 - absent, or a CUDA build failing next to CPU torch
        sys.modules.pop("torchvision", None)
    import transformers.utils.import_utils  # noqa: F401  (see the module docstring)

    sys.meta_path.insert(0, _StubFinder())
