"""Choosing an implementation for a fused op, and launching its Triton kernels.

`impl='auto'` means Triton for CUDA tensors and the PyTorch reference otherwise; the
environment variable T2F_OPS=ref forces the reference everywhere (for debugging and parity
checks). `impl='triton'` on a CPU tensor is an error unless TRITON_INTERPRET=1 (Triton's own
interpreter, which the tests use), because silently running the reference there would hide
that the kernels were never exercised.

When a Triton kernel cannot be compiled or launched on this machine (no C compiler for
Triton's launcher, ptxas failure, too little shared memory, ...), `launch` raises
`KernelUnavailable`; the op then warns once and uses the reference for the rest of the
process, so a broken toolchain costs speed, never a crashed run or a retry storm. Argument
errors (bad shapes, wrong dtype) are raised before any launch and are never swallowed, and
neither are CUDA out-of-memory or device faults, nor any failure under the interpreter (there
a failure is a bug in a kernel, which the tests must see).

TRITON_INTERPRET is read by `triton.jit` when a function is decorated, not when it runs. The
kernels are therefore plain functions jitted lazily by `launch`, once per mode, so that
whether they are interpreted depends on the environment at launch time, not on which module
happened to import them first.
"""

import os
import subprocess
import warnings

import torch

IMPLS = ("auto", "ref", "triton")
_disabled: dict[str, str] = {}  # op name -> why Triton was turned off for this process
_jitted: dict = {}  # (python kernel function, interpret?) -> triton kernel object


class KernelUnavailable(RuntimeError):
    """A Triton kernel could not be compiled or launched on this machine."""


def triton_interpreting() -> bool:
    """True when Triton would run kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    try:
        from triton import knobs
    except ImportError:
        return False
    return bool(knobs.runtime.interpret)


def choose_impl(op: str, impl: str, x: torch.Tensor) -> str:
    """Resolve `impl` for op `op` on tensor `x` to 'ref' or 'triton'."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if os.environ.get("T2F_OPS", "").lower() == "ref" or op in _disabled:
        return "ref"
    if impl == "auto":
        return "triton" if x.is_cuda else "ref"
    if impl == "triton" and not x.is_cuda and not triton_interpreting():
        raise ValueError(
            f"{op}: impl='triton' needs a CUDA tensor, got one on {x.device}; use impl='auto' (reference "
            "on CPU) or set TRITON_INTERPRET=1 to run the Triton kernels in Triton's CPU interpreter"
        )
    return impl


def disable_triton(op: str, error: BaseException) -> None:
    """Record a Triton failure for `op`; warn once; later calls take the reference."""
    if op not in _disabled:
        _disabled[op] = f"{type(error).__name__}: {error}"
        warnings.warn(
            f"t2f.ops.{op}: the Triton kernel failed ({_disabled[op]}); using the PyTorch "
            "reference for the rest of this process (slower, same results).",
            RuntimeWarning,
            stacklevel=3,
        )


def _jit_for_current_mode(fn):
    import triton

    key = (fn, triton_interpreting())
    if key not in _jitted:
        _jitted[key] = triton.jit(fn)
    return _jitted[key]


def _is_toolchain_failure(error: BaseException) -> bool:
    """Failures that mean 'Triton cannot run here', as opposed to bugs or resource faults."""
    from triton.errors import TritonError
    from triton.runtime.errors import InterpreterError

    if isinstance(error, InterpreterError) or triton_interpreting():
        return False
    if isinstance(error, (torch.OutOfMemoryError, getattr(torch, "AcceleratorError", ()))):
        return False
    return isinstance(error, (TritonError, RuntimeError, ImportError, OSError, subprocess.CalledProcessError))


def next_power_of_2(n: int) -> int:
    """Plain-Python triton.next_power_of_2 (for n >= 1). Triton's own, like triton.cdiv, runs through
    its JIT call machinery: about 7 us of host time a call, more than a small layer's kernel takes."""
    return 1 << max(n - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def launch(fn, grid, *args, **meta) -> None:
    """Run the Triton kernel written as plain function `fn` on `grid` (a tuple of ints).

    Raises KernelUnavailable when Triton cannot compile or launch it on this machine.
    """
    try:
        _jit_for_current_mode(fn)[grid](*args, **meta)
    except Exception as error:
        if _is_toolchain_failure(error):
            raise KernelUnavailable(f"{type(error).__name__}: {error}") from error
        raise
