"""Fused flash attention (forward, non-causal) and its torch reference."""
import torch
import torch.nn.functional as F


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    # q (B, H, Nq, D), k/v (B, H, Nk, D) -> (B, H, Nq, D)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)
