"""Fused GroupNorm (+ SiLU) and its torch reference."""
import torch
import torch.nn.functional as F


def group_norm_ref(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float = 1e-5, activation: str | None = None) -> torch.Tensor:
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if activation == "silu" else y
