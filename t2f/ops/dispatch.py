"""Choosing an implementation for a fused op.

`impl='auto'` means Triton for CUDA tensors and the PyTorch reference otherwise; the
environment variable T2F_OPS=ref forces the reference everywhere (for debugging and parity
checks). When a Triton kernel fails to compile, the op warns once and uses the reference for
the rest of the process, so a broken toolchain costs speed, never a crashed run or a retry storm.
"""

import os
import warnings

import torch

IMPLS = ("auto", "ref", "triton")
_disabled: dict[str, str] = {}  # op name -> why Triton was turned off for this process


def choose_impl(op: str, impl: str, x: torch.Tensor) -> str:
    """Resolve `impl` for op `op` on tensor `x` to 'ref' or 'triton'."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if os.environ.get("T2F_OPS", "").lower() == "ref":
        return "ref"
    if impl == "auto":
        return "triton" if x.is_cuda and op not in _disabled else "ref"
    if impl == "triton" and op in _disabled:
        return "ref"
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
