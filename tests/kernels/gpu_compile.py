"""Compiling kernels for a GPU on a machine without one: Triton's compiler runs on the CPU down to the cubin
(through the ``ptxas`` its wheel ships), so a kernel that would not compile for a GPU fails CI, where the
interpreter runs every kernel as Python and would not notice. The compiler runs in a fresh process with the
interpreter off: the interpreter patches ``triton.language`` in the process that ran it, which breaks compiling
there."""

import json
import os
import subprocess
import sys

import pytest

_COMPILE = """
import json, sys
import importlib
try:
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.errors import CompilationError
except ImportError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
for module, kernel, signature, constexprs, capability in json.loads(sys.argv[1]):
    fn = getattr(importlib.import_module(module), kernel)
    constexprs = {name: eval(value, {"tl": tl}) for name, value in constexprs.items()}
    try:
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", capability, 32))
    except CompilationError:
        raise
    except Exception as e:  # no CUDA backend or ptxas in this Triton, or another compiler API
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
    assert compiled.asm["cubin"], kernel
    print(kernel, len(compiled.asm["cubin"]))
"""


def compile_for_gpu(kernels: list[tuple[str, str, dict, dict]], capability: int = 90) -> str:
    """Compiles each ``(module, kernel, signature, constexprs)`` for a CUDA GPU of compute ``capability`` (default an
    H100's): ``signature`` the argument types (``"*fp32"``, ``"i32"``, ``"constexpr"``, ...), ``constexprs`` their
    values as Python source over ``tl`` (``"tl.float32"``, ``"True"``). Returns what the compiling process printed;
    fails with the compiler's error on a kernel it rejects; skips where this Triton cannot compile for CUDA (no
    backend or ``ptxas``, another compiler API)."""
    spec = json.dumps([[module, kernel, signature, constexprs, capability]
                       for module, kernel, signature, constexprs in kernels])
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", _COMPILE, spec], env=env, capture_output=True, text=True,
                          timeout=600)
    if done.returncode == 2:
        pytest.skip(f"Triton cannot compile for CUDA here: {done.stderr.strip()[-300:]}")
    assert done.returncode == 0, done.stderr
    return done.stdout
