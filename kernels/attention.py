"""Fused flash attention (forward, non-causal) in Triton, and its torch reference.

One program computes BLOCK_M query rows of one (batch, head) against all keys, walking the keys BLOCK_N at a
time with the online softmax: it keeps a running row maximum and row sum, rescales the float32 accumulator
whenever the maximum grows, and divides by the sum once at the end. The score matrix never reaches memory.

    scores = q @ k^T * scale * log2(e)        # log2 domain, so exp2 replaces exp (one MUFU op, no multiply)
    p      = exp2(scores - running_max)
    out    = sum(p @ v) / sum(p)

Head dims are whatever the model uses (SD1.5: 40, 80, 160): the block over D is the next power of two and the
loads are masked, so tensors are never padded in memory. Inputs are (B, H, N, D) views with any strides (all
strides are passed), so the (B, N, H*D) projections need no copy. The output has q's layout when q is dense
(`torch.empty_like`; for the UNet's split-heads views that makes `out.transpose(1, 2).flatten(2)` free),
otherwise it is contiguous (B, H, Nq, D); it always has the input dtype.

Without a triton install only `attention_ref` (bottom of the file) is defined.
"""
import math
import os

import torch
import torch.nn.functional as F

from kernels._device import launching_on

try:
    import triton
    import triton.language as tl
except ModuleNotFoundError:  # no triton wheel for this platform (e.g. macOS): the torch reference still works
    triton = None

MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

if triton is not None:
    # (BLOCK_M, BLOCK_N, num_warps, num_stages) for Hopper: 64/128-row tiles run on wgmma (a warpgroup per 64
    # rows) for the long SD sequences; 16/32-row tiles give short sequences (64 tokens x 16 heads) enough
    # programs to fill 132 SMs. The pruning below drops, per head dim, the tiles that overflow.
    _HOPPER_TILES = [
        (128, 128, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (128, 64, 4, 3), (128, 32, 4, 4),
        (64, 128, 4, 2), (64, 64, 4, 3), (64, 64, 8, 3), (64, 32, 4, 4), (64, 32, 8, 3),
        (32, 64, 4, 2), (32, 32, 2, 3), (16, 64, 2, 2), (16, 32, 4, 2), (16, 32, 8, 2), (16, 32, 1, 2),
    ]
    # The interpreter runs programs one by one on the CPU: one mid-size tile, nothing to tune.
    _INTERPRETER_TILES = [(64, 64, 4, 1)]
    _SHARED_MEMORY_LIMIT = 227 * 1024  # per block on H100/H200
    # Float32 accumulator + scores per thread above which ptxas (sm_90) spilled. Half-precision tiles of 64+
    # rows run on wgmma; smaller ones on mma, which also keeps the q, k and v operands in registers, hence the
    # lower bound.
    _REGISTER_ESTIMATE_LIMIT = {"wgmma": 160, "mma": 64}
    # Float32 runs on FMA (exact products, no tensor cores): ptxas (sm_90) spilled from every tile larger than
    # 16 x 32 and, at head dim 160, from all of them; only the smallest ones are worth compiling.
    _FLOAT32_MAX_TILE, _FLOAT32_MIN_WARPS = 16 * 32, 4

    def _interpreting():
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")

    def _attention_configs():
        tiles = _INTERPRETER_TILES if _interpreting() else _HOPPER_TILES
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]

    def _prune_attention_configs(configs, named_args, **kwargs):
        """Drop tiles far larger than the sequences, or too big for shared memory or registers."""
        args = {**named_args, **kwargs}
        element_size, block_d = args["Q"].element_size(), args["BLOCK_D"]
        max_m = max(triton.next_power_of_2(args["N_Q"]), min(c.kwargs["BLOCK_M"] for c in configs))
        max_n = max(triton.next_power_of_2(args["N_KV"]), min(c.kwargs["BLOCK_N"] for c in configs))

        def fits_registers(block_m, block_n, warps):
            if element_size == 4:
                return block_m * block_n <= _FLOAT32_MAX_TILE and warps >= _FLOAT32_MIN_WARPS
            registers = (block_m * block_d + 1.5 * block_m * block_n) / (32 * warps)
            return registers <= _REGISTER_ESTIMATE_LIMIT["wgmma" if block_m >= 64 and warps % 4 == 0 else "mma"]

        def fits(config):
            block_m, block_n, warps = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps
            shared = (block_m + 2 * block_n * max(config.num_stages, 1)) * block_d * element_size
            return (block_m <= max_m and block_n <= max_n and shared <= _SHARED_MEMORY_LIMIT
                    and fits_registers(block_m, block_n, warps))

        kept = [config for config in configs if fits(config)]
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]

    @triton.jit
    def _tile_offsets(rows, dims, stride_row, stride_dim, ALIGN: tl.constexpr):
        """Element offsets of a (rows x dims) tile. Every row starts on an ALIGN-element boundary (the launcher
        checked): without the hint a row stride such as 40 (head dim 40) would force 2-byte loads."""
        return tl.multiple_of(rows[:, None] * stride_row, [ALIGN, ALIGN]) + dims[None, :] * stride_dim

    @triton.jit
    def _attend_to_key_block(q, acc, row_max, row_sum, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                             key_start, N_KV, qk_scale, dims,
                             HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KEYS: tl.constexpr,
                             DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr):
        """One online-softmax step: fold keys [key_start, key_start + BLOCK_N) into the running state."""
        keys = key_start + tl.arange(0, BLOCK_N)
        load_mask = dims[None, :] < HEAD_DIM
        if MASK_KEYS:  # only the last, partial block pays for the key bound
            load_mask = load_mask & (keys[:, None] < N_KV)
        k = tl.load(k_base + _tile_offsets(keys, dims, stride_kn, stride_kd, ALIGN), mask=load_mask, other=0.0)
        v = tl.load(v_base + _tile_offsets(keys, dims, stride_vn, stride_vd, ALIGN), mask=load_mask, other=0.0)

        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASK_KEYS:
            scores = tl.where(keys[None, :] < N_KV, scores, float("-inf"))

        new_max = tl.maximum(row_max, tl.max(scores, 1))
        rescale = tl.exp2(row_max - new_max)  # 0 on the first block, where row_max is -inf
        p = tl.exp2(scores - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * rescale[:, None], input_precision=DOT_PRECISION)
        return acc, new_max, row_sum

    # Lengths and head count only bound loops and masks, never addresses: specialising on their divisibility
    # would compile each tile again for the 77-token cross-attention, for no faster code.
    @triton.autotune(configs=_attention_configs(), key=["HEAD_DIM", "N_Q", "N_KV"],
                     prune_configs_by={"early_config_prune": _prune_attention_configs})
    @triton.jit(do_not_specialize=["H", "N_Q", "N_KV"])
    def _attention_kernel(Q, K, V, Out, qk_scale,
                          stride_qb, stride_qh, stride_qm, stride_qd,
                          stride_kb, stride_kh, stride_kn, stride_kd,
                          stride_vb, stride_vh, stride_vn, stride_vd,
                          stride_ob, stride_oh, stride_om, stride_od,
                          H, N_Q, N_KV,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # A flat grid, query blocks fastest: neighbouring programs share one head's K/V, which stays in L2.
        query_blocks = tl.cdiv(N_Q, BLOCK_M)
        program = tl.program_id(0)
        batch_head, query_block = program // query_blocks, program % query_blocks
        batch, head = (batch_head // H).to(tl.int64), (batch_head % H).to(tl.int64)
        q_base = Q + tl.multiple_of(batch * stride_qb + head * stride_qh, ALIGN)
        k_base = K + tl.multiple_of(batch * stride_kb + head * stride_kh, ALIGN)
        v_base = V + tl.multiple_of(batch * stride_vb + head * stride_vh, ALIGN)
        o_base = Out + tl.multiple_of(batch * stride_ob + head * stride_oh, ALIGN)

        rows = query_block * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        row_mask = (rows[:, None] < N_Q) & (dims[None, :] < HEAD_DIM)
        q = tl.load(q_base + _tile_offsets(rows, dims, stride_qm, stride_qd, ALIGN), mask=row_mask, other=0.0)

        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        full_blocks_end = (N_KV // BLOCK_N) * BLOCK_N
        for key_start in range(0, full_blocks_end, BLOCK_N):
            acc, row_max, row_sum = _attend_to_key_block(
                q, acc, row_max, row_sum, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                key_start, N_KV, qk_scale, dims, HEAD_DIM, BLOCK_N, False, DOT_PRECISION, ALIGN)
        if full_blocks_end < N_KV:
            acc, row_max, row_sum = _attend_to_key_block(
                q, acc, row_max, row_sum, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                full_blocks_end, N_KV, qk_scale, dims, HEAD_DIM, BLOCK_N, True, DOT_PRECISION, ALIGN)

        out = acc / row_sum[:, None]
        tl.store(o_base + _tile_offsets(rows, dims, stride_om, stride_od, ALIGN),
                 out.to(Out.dtype.element_ty), mask=row_mask)

    # triton.jit chose at import: the interpreter (TRITON_INTERPRET=1, CPU tensors) or compiled GPU code.
    INTERPRETED = not isinstance(_attention_kernel.fn, triton.runtime.JITFunction)
    launches = 0  # Triton attention launches in this process (tests use it to prove the kernel ran)

    def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                         out: torch.Tensor | None = None) -> torch.Tensor:
        """softmax(q k^T * scale) v for q (B, H, Nq, D), k and v (B, H, Nk, D), any strides.

        `scale` defaults to 1/sqrt(D). `out`, when given, receives the result (any strides, q's shape and
        dtype); otherwise it is `torch.empty_like(q)`: q's layout when q is dense, else contiguous.
        """
        global launches
        _check_attention_inputs(q, k, v, scale, out)
        batch, heads, n_q, head_dim = q.shape
        n_kv = k.shape[2]
        out = torch.empty_like(q) if out is None else out
        if out.numel() == 0:
            return out
        scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
        # float32 inputs get true float32 products; TF32 would be ten times less exact than the reference
        precision = "ieee" if q.dtype == torch.float32 else "tf32"

        def grid(meta):
            return (triton.cdiv(n_q, meta["BLOCK_M"]) * batch * heads,)

        with launching_on(q):
            _attention_kernel[grid](
                q, k, v, out, scale * math.log2(math.e),
                *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                heads, n_q, n_kv,
                HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), DOT_PRECISION=precision,
                ALIGN=_row_alignment((q, k, v, out)))
        launches += 1
        return out

    def _row_alignment(tensors) -> int:
        """Elements (up to one 16-byte vector) that every (batch, head, row) start of every tensor is aligned to."""
        alignment = 16 // tensors[0].element_size()
        starts = [t.data_ptr() // t.element_size() for t in tensors] + [s for t in tensors for s in t.stride()[:3]]
        while alignment > 1 and any(start % alignment for start in starts):
            alignment //= 2
        return alignment

    def _check_attention_inputs(q, k, v, scale, out):
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(f"attention: {name} must be 4-D (B, H, N, D), got shape {tuple(t.shape)}")
            if t.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"attention: {name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
        if not (q.dtype == k.dtype == v.dtype):
            raise TypeError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
        if not (q.device == k.device == v.device):
            raise ValueError(f"attention: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
        if q.device.type != "cuda" and not INTERPRETED:
            raise RuntimeError(f"attention: Triton needs CUDA tensors (got {q.device}); on a CPU, set "
                               "TRITON_INTERPRET=1 before importing kernels")
        if k.shape != v.shape:
            raise ValueError(f"attention: k and v shapes differ ({tuple(k.shape)} vs {tuple(v.shape)})")
        if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
            raise ValueError(f"attention: q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree on B, H and D")
        if not 1 <= q.shape[3] <= MAX_HEAD_DIM:
            raise ValueError(f"attention: head dim {q.shape[3]} is outside 1..{MAX_HEAD_DIM}")
        if k.shape[2] == 0:
            raise ValueError("attention: k and v have no keys (Nk = 0)")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
            raise TypeError(f"attention: scale must be a Python float or None, got {type(scale).__name__}")
        if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
            raise ValueError(f"attention: out must match q ({tuple(q.shape)}, {q.dtype}, {q.device}), got "
                             f"({tuple(out.shape)}, {out.dtype}, {out.device})")

    # One opaque op for torch.compile and CUDA-graph capture; the fake gives the output's shape and layout.
    @torch.library.custom_op("inpaint::attention", mutates_args=())
    def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        return attention_triton(q, k, v, scale)

    @attention_op.register_fake
    def _attention_fake(q, k, v, scale=None):
        return torch.empty_like(q)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    # q (B, H, Nq, D), k/v (B, H, Nk, D) -> (B, H, Nq, D)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)
