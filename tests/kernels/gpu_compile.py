"""Compiling kernels for a GPU on a machine without one: Triton's compiler runs on the CPU down to the cubin
(through the ``ptxas`` its wheel ships), so a kernel that would not compile for a GPU fails CI, where the
interpreter runs every kernel as Python and would not notice. The compiler runs in a fresh process with the
interpreter off: the interpreter patches ``triton.language`` in the process that ran it, which breaks compiling
there."""

import contextlib
import inspect
import json
import os
import subprocess
import sys

import pytest
import torch
import triton.language as tl

from persample.kernels.launch import Launcher

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


_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
          torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
          torch.bool: "i1"}


def _argument_type(spec: tuple) -> str:
    """The compiler's type of one launch argument from :func:`persample.kernels.launch`'s specialization of it."""
    if isinstance(spec[0], torch.dtype):
        return f"*{_TYPES[spec[0]]}"
    if spec[0] is float:
        return "fp32"
    if spec[0] is bool:
        return "i1"
    if spec[0] is int:
        return "i32" if spec[3] else "i64"
    raise TypeError(f"no compiler type for a launch argument specialized as {spec}")


def _source(value) -> str:
    """A constexpr's value as Python source over ``tl``."""
    return f"tl.dtype({value.name!r})" if isinstance(value, tl.dtype) else repr(value)


@contextlib.contextmanager
def recorded_launches():
    """Yields a dict that fills with one ``(module, kernel, signature, constexprs)`` entry (for
    :func:`compile_for_gpu`) per kernel and specialization launched inside, on the interpreter's path (where each
    launch makes a :class:`~persample.kernels.launch.Launcher` that knows its kernel)."""
    seen: dict = {}
    made = Launcher.__init__

    def record(self, compiled, consts, kernel=None, constexprs=None, num_warps=0, spec=()):
        made(self, compiled, consts, kernel, constexprs, num_warps, spec)
        fn = getattr(kernel, "fn", None)
        if fn is None:
            return
        names = list(inspect.signature(fn).parameters)
        signature = {name: _argument_type(s) for name, s in zip(names, spec, strict=False)}
        signature.update(dict.fromkeys(constexprs, "constexpr"))
        values = {name: _source(v) for name, v in constexprs.items()}
        key = (fn.__module__, fn.__name__, tuple(signature.items()), tuple(values.items()))
        seen.setdefault(key, (fn.__module__, fn.__name__, signature, values))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Launcher, "__init__", record)
        yield seen
