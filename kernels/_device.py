"""The device a Triton kernel launches on."""
import contextlib

import torch


def launching_on(t: torch.Tensor):
    """Triton launches on the current CUDA device, in its current stream: make that t's device, or a cuda:1 input
    would be handed to a kernel running on cuda:0. On the same device this changes nothing (and stays capturable)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
