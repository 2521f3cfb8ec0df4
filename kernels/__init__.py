"""Kernel dispatch: Triton on CUDA, the torch reference elsewhere (DESIGN §2b).

INPAINT_KERNELS selects the implementation and is read on every call (a dict lookup; parsing is cached),
so a process can switch it at run time, e.g. with `use_kernels("torch")`:

- `auto` (default): the Triton kernels for CUDA tensors when triton is installed, else the torch reference;
- `triton`: always the Triton kernels; CPU tensors need TRITON_INTERPRET=1 set before this package is
  imported (the interpreter; slow, for tests); a clear error otherwise;
- `torch`: always the torch reference (`attention_ref`, `group_norm_ref`).

Attention with a head dim above 256 (the VAE's single 512-wide head) always takes the reference
(`F.scaled_dot_product_attention`'s own fused kernels): the Triton kernel's tiles stop at 256.

Under torch.compile the kernels are reached through the custom ops `torch.ops.inpaint.attention` and
`torch.ops.inpaint.group_norm`, which the compiler treats as single opaque ops, and the mode is read once, when
the function is traced; eager calls and CUDA-graph capture launch the kernels directly, skipping the op
dispatcher's overhead. The first call for each new shape autotunes (timing runs, host syncs): make it before
CUDA-graph capture.
"""
import contextlib
import functools
import os

import torch

from worker.inference.names import KERNEL_MODES

from . import attention as _attention_module
from . import group_norm as _group_norm_module
from .attention import attention_ref
from .group_norm import group_norm_ref
TRITON_AVAILABLE = _attention_module.triton is not None


@functools.lru_cache(maxsize=None)
def _parse_mode(raw: str) -> str:
    mode = raw.strip().lower() or "auto"
    if mode not in KERNEL_MODES:
        raise ValueError(f"INPAINT_KERNELS={raw!r}: expected one of {', '.join(KERNEL_MODES)}")
    return mode


@torch.compiler.assume_constant_result  # torch.compile bakes the mode in at trace time, without tracing this
def kernel_mode() -> str:
    return _parse_mode(os.environ.get("INPAINT_KERNELS", "auto"))


@contextlib.contextmanager
def use_kernels(mode: str):
    """Run a block with INPAINT_KERNELS=mode, restoring the previous value after (not thread-safe)."""
    _parse_mode(mode)
    previous = os.environ.get("INPAINT_KERNELS")
    os.environ["INPAINT_KERNELS"] = mode
    try:
        yield
    finally:
        if previous is None:
            del os.environ["INPAINT_KERNELS"]
        else:
            os.environ["INPAINT_KERNELS"] = previous


def _use_triton(x: torch.Tensor) -> bool:
    mode = kernel_mode()
    if mode == "torch":
        return False
    if mode == "auto":
        return TRITON_AVAILABLE and x.is_cuda
    if not TRITON_AVAILABLE:
        raise RuntimeError("INPAINT_KERNELS=triton, but triton is not installed")
    return True


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v; q (B, H, Nq, D), k and v (B, H, Nk, D), any strides; scale default 1/sqrt(D)."""
    if q.shape[-1] > _attention_module.MAX_HEAD_DIM or not _use_triton(q):
        return attention_ref(q, k, v, scale)
    if torch.compiler.is_compiling():
        return torch.ops.inpaint.attention(q, k, v, scale)
    return _attention_module.attention_triton(q, k, v, scale)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-5, activation: str | None = None) -> torch.Tensor:
    """F.group_norm, then F.silu when activation == "silu"; x (N, C, *spatial), contiguous or channels_last."""
    if not _use_triton(x):
        return group_norm_ref(x, num_groups, weight, bias, eps, activation)
    if torch.compiler.is_compiling():
        return torch.ops.inpaint.group_norm(x, num_groups, weight, bias, eps, activation)
    return _group_norm_module.group_norm_triton(x, num_groups, weight, bias, eps, activation)


__all__ = ["attention", "group_norm", "kernel_mode", "use_kernels", "attention_ref", "group_norm_ref",
           "TRITON_AVAILABLE"]
