"""`megatron_dgpo.compat.megatron_import`: on CPU, `import megatron.core` after `megatron_dgpo` runs
without Megatron's `torch.compile` decorators (inductor's compiler and networkx never imported;
torch._dynamo is, at import time, see test_dynamo_imported_at_import_time);
torch.compile is the real one afterwards; with CUDA, or when megatron.core came first, Megatron's
own behaviour is untouched. Each case runs in a fresh interpreter: the hook acts on a first import."""
import json
import subprocess
import sys
import textwrap

import pytest

REPORT = """
import json, sys, torch
import megatron.core.jit as jit
from megatron.core.fusions import fused_bias_geglu
print(json.dumps({
    "dynamo": "torch._dynamo" in sys.modules,
    "compile_fx": "torch._inductor.compile_fx" in sys.modules,
    "networkx": "networkx" in sys.modules,
    "fuser": jit.jit_fuser.__qualname__,
    "fuser_module": jit.jit_fuser.__module__,
    "compile_is_torch": torch.compile.__module__ == "torch" and torch.compile.__name__ == "compile",
    "geglu_plain": not hasattr(fused_bias_geglu.quick_gelu, "__wrapped__"),  # torch.compile wraps
    "loader": type(sys.modules["megatron.core"].__loader__).__name__,
}))
"""


def _run(prelude: str) -> dict:
    code = textwrap.dedent(prelude) + REPORT
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_package_import_stays_light():
    out = subprocess.run([sys.executable, "-c", "import sys, megatron_dgpo, megatron_dgpo.tool_cli; "
                          "print('torch' in sys.modules, 'megatron.core' in sys.modules)"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_cpu_import_skips_torch_compile():
    r = _run("import megatron_dgpo.train.step\n")
    assert not r["compile_fx"] and not r["networkx"], r
    assert (r["fuser"], r["fuser_module"]) == ("noop_decorator", "megatron.core.jit"), r
    assert r["compile_is_torch"] and r["geglu_plain"], r
    assert r["loader"] == "SourceFileLoader", r


def test_plain_fusion_is_megatrons_formula():
    """The decorated functions are Megatron's own bodies: the same values as Megatron's compiled
    ones would give, here against the formula they implement (x * sigmoid(1.702 x))."""
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", textwrap.dedent("""
        import torch, megatron_dgpo
        from megatron.core.fusions.fused_bias_geglu import quick_gelu
        x = torch.linspace(-6, 6, 101, dtype=torch.float64)
        print(float((quick_gelu(x) - x * torch.sigmoid(1.702 * x)).abs().max()))
    """)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.split()[-1]) == 0.0


@pytest.mark.parametrize("prelude", [
    "import megatron.core\nimport megatron_dgpo\n",  # Megatron first: the hook must not act
    "import torch\ntorch.cuda.is_available = lambda: True\nimport megatron_dgpo\nimport megatron.core\n",  # CUDA
], ids=["megatron-first", "cuda"])
def test_megatron_untouched_otherwise(prelude):
    r = _run(prelude)
    assert r["dynamo"] and r["compile_fx"], r
    assert r["fuser"] == "compile" and r["fuser_module"] == "torch", r
    assert not r["geglu_plain"], r
    assert r["compile_is_torch"], r


def test_dynamo_imported_at_import_time():
    """torch.optim's add_param_group (@torch._disable_dynamo) imports torch._dynamo on first use; that
    import leaves a reference cycle through its caller's frames (here: an object made by the
    caller outlives it without the cyclic gc). The hook imports torch._dynamo with megatron.core,
    so the first optimizer built later leaves nothing behind."""
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", textwrap.dedent("""
        import gc, sys, weakref, torch, megatron_dgpo
        import megatron.core
        class Obj: pass
        def build():
            o = Obj()
            torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
            return weakref.ref(o)
        gc.disable()
        print("torch._dynamo" in sys.modules, build()() is None)
    """)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["True", "True"]
