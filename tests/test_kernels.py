"""The Triton kernels (kernels/) against float64 references, their launchers' input checks, and the dispatch.

On a machine without CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1), so shapes are
small. Accuracy rule: the kernel's error against a float64 reference is at most twice the error torch itself
makes in the same dtype, plus a tiny absolute floor. Outputs are poisoned with NaN before each launch, so a
row or channel the kernel forgot to write fails the test.

bfloat16 is tested on a GPU only: Triton's interpreter multiplies bfloat16 tiles as raw 16-bit integers in
`tl.dot` and truncates float32 -> bfloat16 instead of rounding to nearest.
"""
import importlib
import math
import os

import pytest
import torch

if not torch.cuda.is_available():  # the interpreter, set before triton is imported (tests/conftest.py does too)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernels  # noqa: E402
from kernels import attention_ref, group_norm_ref  # noqa: E402

attention_module = importlib.import_module("kernels.attention")  # `kernels.attention` is the dispatch function
group_norm_module = importlib.import_module("kernels.group_norm")

CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not kernels.TRITON_AVAILABLE, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
DEVICE = "cuda" if CUDA else "cpu"
FLOAT32_FLOOR = 1e-6
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


def assert_within_twice_torch_error(actual, torch_result, exact, what):
    """The kernel may be off from float64 by at most twice torch's own error in that dtype (+ a tiny floor)."""
    assert actual.dtype == torch_result.dtype and actual.shape == exact.shape
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (unwritten NaN poison?)"
    kernel_error = (actual.double() - exact).abs().max().item()
    torch_error = (torch_result.double() - exact).abs().max().item()
    floor = FLOAT32_FLOOR if actual.dtype == torch.float32 else 0.0
    assert kernel_error <= 2 * torch_error + floor, f"{what}: error {kernel_error:.3g} vs torch's {torch_error:.3g}"


# ---------------------------------------------------------------------------------------------- attention

def make_qkv(batch, heads, n_q, n_kv, head_dim, layout, dtype, device=DEVICE, seed=0):
    """Random q, k, v as the model makes them: contiguous, split from (B, N, H*D) projections, or fused k|v."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    if layout == "contiguous":
        return tuple(randn(batch, heads, n, head_dim) for n in (n_q, n_kv, n_kv))
    q = randn(batch, n_q, heads * head_dim).view(batch, n_q, heads, head_dim).transpose(1, 2)
    if layout == "projected":
        k, v = (randn(batch, n_kv, heads * head_dim).view(batch, n_kv, heads, head_dim).transpose(1, 2)
                for _ in range(2))
    else:  # "fused_kv": one (B, Nk, 2, H, D) projection; k and v are interleaved, non-dense views of it
        kv = randn(batch, n_kv, 2, heads, head_dim)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    return q, k, v


def attention_float64(q, k, v, scale):
    return torch.cat([attention_ref(q[i:i + 1].double(), k[i:i + 1].double(), v[i:i + 1].double(), scale)
                      for i in range(q.shape[0])])


ATTENTION_CASES = [  # (B, H, Nq, Nk, D, layout, scale)
    (2, 2, 64, 77, 40, "projected", None),  # cross-attention over the 77 text tokens
    (1, 2, 33, 1, 80, "contiguous", None),  # a single key
    (1, 2, 1, 77, 40, "projected", None),  # a single query
    (1, 1, 70, 129, 160, "projected", 0.3),  # lengths just past a block; SD's widest head
    (1, 2, 128, 128, 64, "fused_kv", None),  # self-attention in whole blocks, power-of-two head dim
    (2, 1, 37, 37, 24, "contiguous", 0.5),  # odd head dim and length
    (1, 2, 21, 129, 72, "fused_kv", None),
]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,heads,n_q,n_kv,head_dim,layout,scale", ATTENTION_CASES)
def test_attention_matches_float64(batch, heads, n_q, n_kv, head_dim, layout, scale, dtype):
    q, k, v = make_qkv(batch, heads, n_q, n_kv, head_dim, layout, dtype)
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=q.device)
    launches = attention_module.launches
    result = attention_module.attention_triton(q, k, v, scale, out=out)
    assert result is out and attention_module.launches == launches + 1
    assert_within_twice_torch_error(out, attention_ref(q, k, v, scale), attention_float64(q, k, v, scale),
                                    f"attention {dtype} {layout} D={head_dim} Nq={n_q} Nk={n_kv}")


@needs_triton
@pytest.mark.parametrize("layout", ["projected", "fused_kv", "contiguous"])
def test_attention_output_takes_the_layout_of_a_dense_q(layout):
    q, k, v = make_qkv(1, 2, 9, 11, 40, layout, torch.float32)
    out = attention_module.attention_triton(q, k, v)
    assert out.shape == q.shape and out.stride() == q.stride()
    assert torch.allclose(out, attention_ref(q, k, v), atol=1e-5)


@needs_triton
def test_attention_default_scale_is_one_over_sqrt_head_dim():
    q, k, v = make_qkv(1, 1, 16, 16, 40, "contiguous", torch.float32)
    explicit = attention_module.attention_triton(q, k, v, 1 / math.sqrt(40))
    assert torch.equal(attention_module.attention_triton(q, k, v), explicit)
    assert not torch.allclose(attention_module.attention_triton(q, k, v, 1.0), explicit, atol=1e-3)


def _qkv(shape_q=(1, 2, 8, 40), shape_kv=(1, 2, 8, 40), dtype=torch.float32):
    return torch.randn(shape_q, dtype=dtype), torch.randn(shape_kv, dtype=dtype), torch.randn(shape_kv, dtype=dtype)


ATTENTION_ERRORS = [
    (lambda: (torch.randn(2, 8, 40), *_qkv()[1:]), {}, "must be 4-D"),
    (lambda: _qkv(dtype=torch.float64), {}, "dtype torch.float64"),
    (lambda: (*_qkv()[:2], torch.randn(1, 2, 8, 40, dtype=torch.float16)), {}, "dtypes differ"),
    (lambda: _qkv((1, 2, 8, 300), (1, 2, 8, 300)), {}, "head dim 300"),
    (lambda: _qkv((1, 2, 8, 40), (1, 2, 8, 48)), {}, "must agree on B, H and D"),
    (lambda: _qkv((1, 2, 8, 40), (1, 3, 8, 40)), {}, "must agree on B, H and D"),
    (lambda: (*_qkv()[:2], torch.randn(1, 2, 9, 40)), {}, "k and v shapes differ"),
    (lambda: _qkv((1, 2, 8, 40), (1, 2, 0, 40)), {}, "no keys"),
    (lambda: _qkv(), {"scale": torch.tensor(0.1)}, "scale must be a Python float"),
    (lambda: _qkv(), {"out": torch.empty(1, 2, 8, 41)}, "out must match q"),
]


@needs_triton
@pytest.mark.parametrize("make_inputs,kwargs,message", ATTENTION_ERRORS)
def test_attention_launcher_rejects_bad_input(make_inputs, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        attention_module.attention_triton(*make_inputs(), **kwargs)


# ---------------------------------------------------------------------------------------------- group norm

GROUP_NORM_CASES = [  # (shape, groups, channels_last, activation, splits, affine)
    ((2, 8, 5, 7), 8, False, "silu", None, True),  # C = groups
    ((2, 16, 9, 5), 4, True, None, None, True),  # C = 4 x groups, channels_last
    ((1, 8, 13, 11), 2, False, "silu", 3, True),  # the split reduction, forced on a small map
    ((1, 8, 13, 11), 2, True, None, 3, True),
    ((2, 12, 7, 3), 3, True, "silu", 2, False),  # no affine
    ((2, 8, 3, 4, 5), 4, False, "silu", None, True),  # 5-D (video-like) input
    ((3, 8, 17), 2, False, None, 2, True),  # 3-D input
]


def make_group_norm_inputs(shape, channels_last, affine, dtype, device=DEVICE, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # An offset mean makes a naive sum-of-squares variance lose digits; the kernel must not.
    x = (torch.randn(shape, generator=generator) * 3 + 2).to(device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight, bias = ((torch.randn(shape[1], generator=generator).to(device=device, dtype=dtype) for _ in range(2))
                    if affine else (None, None))
    return x, weight, bias


def group_norm_float64(x, groups, weight, bias, eps, activation):
    double = (lambda t: None if t is None else t.double())
    return group_norm_ref(x.double(), groups, double(weight), double(bias), eps, activation)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,groups,channels_last,activation,splits,affine", GROUP_NORM_CASES)
def test_group_norm_matches_float64(shape, groups, channels_last, activation, splits, affine, dtype):
    x, weight, bias = make_group_norm_inputs(shape, channels_last, affine, dtype)
    out = torch.full_like(x, float("nan"))
    launches = group_norm_module.launches
    result = group_norm_module.group_norm_triton(x, groups, weight, bias, 1e-5, activation, out=out, splits=splits)
    assert result is out and group_norm_module.launches == launches + 1
    assert_within_twice_torch_error(out, group_norm_ref(x, groups, weight, bias, 1e-5, activation),
                                    group_norm_float64(x, groups, weight, bias, 1e-5, activation),
                                    f"group_norm {dtype} {shape} channels_last={channels_last} splits={splits}")


@needs_triton
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_output_keeps_the_input_layout(channels_last):
    x, weight, bias = make_group_norm_inputs((2, 8, 6, 5), channels_last, True, torch.float32)
    out = group_norm_module.group_norm_triton(x, 4, weight, bias, activation="silu")
    assert out.stride() == x.stride()
    assert torch.allclose(out, group_norm_ref(x, 4, weight, bias, 1e-5, "silu"), atol=1e-5)


@needs_triton
def test_group_norm_with_weight_only_matches_torch():
    x, weight, _ = make_group_norm_inputs((2, 8, 5, 5), False, True, torch.float32)
    out = group_norm_module.group_norm_triton(x, 2, weight, None)
    assert torch.allclose(out, group_norm_ref(x, 2, weight, None), atol=1e-5)


@needs_triton
@pytest.mark.parametrize("channels_per_group,positions,splits", [(4, 143, 3), (10, 4096, 9), (1, 7, 5), (16, 10, 8)])
def test_split_plan_cuts_positions_into_whole_tiles(channels_per_group, positions, splits):
    block_c, block_s, split_size, planned = group_norm_module.split_plan(channels_per_group, positions, splits)
    assert 1 <= planned <= splits and split_size % block_s == 0
    assert (planned - 1) * split_size < positions <= planned * split_size  # every split has work, all covered
    assert block_c >= min(channels_per_group, 64) and block_c & (block_c - 1) == 0


@needs_triton
def test_split_plan_keeps_a_forced_split_on_a_small_map():
    assert group_norm_module.split_plan(4, 13 * 11, 3)[3] == 3


GROUP_NORM_ERRORS = [
    (lambda: (torch.randn(2, 6, 4, 4), 4), {}, "divisible by num_groups"),
    (lambda: (torch.randn(6), 3), {}, r"\(N, C, \*spatial\)"),
    (lambda: (torch.randn(2, 8, 4, 4, dtype=torch.float64), 4), {}, "dtype torch.float64"),
    (lambda: (torch.randn(2, 8, 4, 4), 0), {}, "num_groups must be a positive int"),
    (lambda: (torch.randn(2, 8, 4, 4), 4, torch.randn(4)), {}, r"weight must be a tensor of shape \(8,\)"),
    (lambda: (torch.randn(2, 8, 4, 4), 4, None, torch.randn(8, 1)), {}, r"bias must be a tensor of shape \(8,\)"),
    (lambda: (torch.randn(2, 8, 4, 4), 4), {"activation": "gelu"}, "activation must be None or 'silu'"),
    (lambda: (torch.randn(2, 8, 4, 4), 4), {"eps": -1.0}, "eps must be a non-negative"),
    (lambda: (torch.randn(2, 8, 4, 6).transpose(2, 3), 4), {}, "contiguous or channels_last"),
    (lambda: (torch.randn(2, 8, 4, 4), 4), {"splits": 0}, "splits must be a positive int"),
    (lambda: (torch.randn(2, 8, 4, 4), 4), {"out": torch.empty(2, 8, 4, 5)}, "out must match x"),
]


@needs_triton
@pytest.mark.parametrize("make_args,kwargs,message", GROUP_NORM_ERRORS)
def test_group_norm_launcher_rejects_bad_input(make_args, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        group_norm_module.group_norm_triton(*make_args(), **kwargs)


def test_group_norm_reference_rejects_unknown_activation():
    with pytest.raises(ValueError, match="activation"):
        group_norm_ref(torch.randn(1, 4, 2, 2), 2, None, None, activation="relu")


# ---------------------------------------------------------------------------------------------- dispatch

def _attention_then_norm(q, k, v, x, groups, weight, bias):
    return kernels.attention(q, k, v), kernels.group_norm(x, groups, weight, bias, 1e-5, "silu")


@needs_triton
def test_dispatch_triton_mode_launches_both_kernels():
    q, k, v = make_qkv(1, 2, 16, 77, 40, "projected", torch.float32)
    x, weight, bias = make_group_norm_inputs((2, 8, 5, 5), True, True, torch.float32)
    attention_launches, group_norm_launches = attention_module.launches, group_norm_module.launches
    with kernels.use_kernels("triton"):
        assert kernels.kernel_mode() == "triton"
        out = kernels.attention(q, k, v)
        y = kernels.group_norm(x, 4, weight, bias, 1e-5, "silu")
    assert attention_module.launches == attention_launches + 1
    assert group_norm_module.launches == group_norm_launches + 1
    assert torch.allclose(out, attention_ref(q, k, v), atol=1e-5)
    assert torch.allclose(y, group_norm_ref(x, 4, weight, bias, 1e-5, "silu"), atol=1e-5)


@pytest.mark.parametrize("mode", ["torch"] + ([] if CUDA else ["auto"]))
def test_dispatch_reference_modes_do_not_launch(mode):
    q, k, v = make_qkv(1, 2, 16, 16, 40, "contiguous", torch.float32)
    x, weight, bias = make_group_norm_inputs((2, 8, 5, 5), False, True, torch.float32)
    launches = (getattr(attention_module, "launches", 0), getattr(group_norm_module, "launches", 0))
    with kernels.use_kernels(mode):
        assert torch.equal(kernels.attention(q, k, v), attention_ref(q, k, v))
        assert torch.equal(kernels.group_norm(x, 4, weight, bias, 1e-5, "silu"),
                           group_norm_ref(x, 4, weight, bias, 1e-5, "silu"))
    assert (getattr(attention_module, "launches", 0), getattr(group_norm_module, "launches", 0)) == launches


@needs_triton
def test_dispatch_sends_head_dims_above_256_to_the_reference():
    q, k, v = make_qkv(1, 1, 8, 8, 512, "contiguous", torch.float32)  # the VAE's single 512-wide head
    launches = attention_module.launches
    with kernels.use_kernels("triton"):
        assert torch.equal(kernels.attention(q, k, v), attention_ref(q, k, v))
    assert attention_module.launches == launches


def test_dispatch_reads_the_environment_on_each_call(monkeypatch):
    monkeypatch.setenv("INPAINT_KERNELS", "torch")
    assert kernels.kernel_mode() == "torch"
    monkeypatch.setenv("INPAINT_KERNELS", " Triton ")
    assert kernels.kernel_mode() == "triton"
    monkeypatch.delenv("INPAINT_KERNELS")
    assert kernels.kernel_mode() == "auto"


def test_unknown_kernel_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("INPAINT_KERNELS", "cuda")
    with pytest.raises(ValueError, match="INPAINT_KERNELS='cuda'"):
        kernels.attention(*make_qkv(1, 1, 4, 4, 8, "contiguous", torch.float32))
    with pytest.raises(ValueError, match="expected one of auto, triton, torch"):
        with kernels.use_kernels("fast"):
            pass


def test_use_kernels_restores_the_previous_mode(monkeypatch):
    monkeypatch.setenv("INPAINT_KERNELS", "torch")
    with kernels.use_kernels("auto"):
        assert kernels.kernel_mode() == "auto"
    assert os.environ["INPAINT_KERNELS"] == "torch"
    monkeypatch.delenv("INPAINT_KERNELS")
    with kernels.use_kernels("torch"):
        assert kernels.kernel_mode() == "torch"
    assert "INPAINT_KERNELS" not in os.environ


def run_python(code, **environment):
    """Run code in a fresh interpreter, from the repository root, with TRITON_INTERPRET unset."""
    import subprocess
    import sys

    environment = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **environment}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=300)


@needs_triton
def test_triton_mode_on_cpu_without_the_interpreter_is_a_clear_error():
    done = run_python("import torch, kernels\n"
                      "q = torch.randn(1, 1, 4, 8)\n"
                      "kernels.attention(q, q, q)", INPAINT_KERNELS="triton", CUDA_VISIBLE_DEVICES="")
    assert done.returncode != 0 and "Triton needs CUDA tensors" in done.stderr and "TRITON_INTERPRET=1" in done.stderr


def test_without_triton_installed_the_reference_runs():
    done = run_python("import sys\n"
                      "sys.modules['triton'] = None  # what `import triton` meets on a machine without it\n"
                      "import torch, kernels\n"
                      "q = torch.randn(1, 2, 4, 8)\n"
                      "x = torch.randn(1, 4, 3, 3)\n"
                      "assert not kernels.TRITON_AVAILABLE\n"
                      "assert torch.equal(kernels.attention(q, q, q), kernels.attention_ref(q, q, q))\n"
                      "y = kernels.group_norm(x, 2, None, None)\n"
                      "assert torch.equal(y, kernels.group_norm_ref(x, 2, None, None))\n"
                      "with kernels.use_kernels('triton'):\n"
                      "    kernels.attention(q, q, q)\n")
    assert done.returncode != 0 and "INPAINT_KERNELS=triton, but triton is not installed" in done.stderr, done.stderr


@needs_triton
def test_custom_ops_pass_torch_library_checks():
    # schema, fake (meta) kernel, autograd registration, and tracing by AOT dispatch
    q, k, v = make_qkv(1, 2, 16, 20, 40, "projected", torch.float32)
    torch.library.opcheck(torch.ops.inpaint.attention.default, (q, k, v, None))
    x, weight, bias = make_group_norm_inputs((2, 8, 5, 5), True, True, torch.float32)
    torch.library.opcheck(torch.ops.inpaint.group_norm.default, (x, 4, weight, bias, 1e-5, "silu"))


@needs_triton
@pytest.mark.parametrize("mode", ["triton", "torch"])
def test_dispatch_traces_into_a_single_graph_under_torch_compile(mode):
    q, k, v = make_qkv(1, 2, 16, 20, 40, "projected", torch.float32)
    x, weight, bias = make_group_norm_inputs((2, 8, 5, 5), False, True, torch.float32)
    launches = attention_module.launches
    with kernels.use_kernels(mode):
        torch._dynamo.reset()
        compiled = torch.compile(_attention_then_norm, fullgraph=True, backend="eager")  # raises on a graph break
        out, y = compiled(q, k, v, x, 4, weight, bias)
    assert attention_module.launches == launches + (mode == "triton")
    assert torch.allclose(out, attention_ref(q, k, v), atol=1e-5)
    assert torch.allclose(y, group_norm_ref(x, 4, weight, bias, 1e-5, "silu"), atol=1e-5)


# ---------------------------------------------------------------------------------------------- Hopper code

# Compiles the kernels for sm_90 (H100/H200) without a GPU, specialised as Triton's JIT would for SD-like
# arguments: catches what the interpreter does not check (code generation, layouts, alignment hints).
HOPPER_COMPILE = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

attention = importlib.import_module("kernels.attention")
group_norm = importlib.import_module("kernels.group_norm")

def compile_for_hopper(kernel, values, num_warps, num_stages=3):
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        value = values[name]
        if isinstance(value, tuple):  # ("constexpr", v)
            signature[name], constexprs[name] = "constexpr", value[1]
        elif isinstance(value, str):  # a pointer, 16-byte aligned like torch's allocations
            signature[name], attrs[(i,)] = value, [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif name in kernel.do_not_specialize:
            signature[name] = "i32"
        elif value == 1:  # the JIT turns 1 into a constant
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    return compiled.asm["ptx"]

def attention_ptx(dtype, heads, n, head_dim, tile):
    block_m, block_n, warps, stages = tile
    strides = (n * heads * head_dim, head_dim, heads * head_dim, 1)  # a (B, N, H*D) projection split into heads
    names = [f"stride_{t}{a}" for t in "qkvo" for a in ("b", "h", "m" if t in "qo" else "n", "d")]
    values = dict(zip(names, strides * 4), Q=dtype, K=dtype, V=dtype, Out=dtype, qk_scale=0.1, H=heads, N_Q=n,
                  N_KV=n, HEAD_DIM=("constexpr", head_dim),
                  BLOCK_D=("constexpr", max(16, triton.next_power_of_2(head_dim))),
                  DOT_PRECISION=("constexpr", "ieee" if dtype == "*fp32" else "tf32"),
                  ALIGN=("constexpr", 4 if dtype == "*fp32" else 8),
                  BLOCK_M=("constexpr", block_m), BLOCK_N=("constexpr", block_n))
    return compile_for_hopper(attention._attention_kernel.fn, values, warps, stages)

def group_norm_ptx(kernel, channels, positions, channels_last):
    per_group = channels // 32
    block_c, block_s, split_size, splits = group_norm.split_plan(per_group, positions, 4)
    strides = (channels * positions, 1, channels) if channels_last else (channels * positions, positions, 1)
    values = dict(X="*fp16", Out="*fp16", Weight="*fp16", Bias="*fp16", Partials="*fp32", GROUPS=32, S=positions,
                  SPLITS=splits, SPLIT_SIZE=split_size, eps=1e-5, CHANNELS_PER_GROUP=("constexpr", per_group),
                  BLOCK_C=("constexpr", block_c), BLOCK_S=("constexpr", block_s),
                  AFFINE=("constexpr", True), APPLY_SILU=("constexpr", True),
                  BLOCK_SPLITS=("constexpr", triton.next_power_of_2(splits)),
                  **dict(zip(("stride_xn", "stride_xc", "stride_xs"), strides)),
                  **dict(zip(("stride_on", "stride_oc", "stride_os"), strides)))
    return compile_for_hopper(kernel, values, 8)

ptx = {
    "attention fp16 D=40": attention_ptx("*fp16", 8, 4096, 40, (128, 64, 8, 3)),
    "attention bf16 D=160": attention_ptx("*bf16", 8, 64, 160, (64, 32, 8, 3)),
    "attention fp32 D=72 (exact float32 products, no tensor cores)": attention_ptx("*fp32", 8, 77, 72, (16, 32, 4, 2)),
    "group norm stats NCHW": group_norm_ptx(group_norm._group_stats_kernel, 320, 4096, False),
    "group norm apply channels_last": group_norm_ptx(group_norm._group_apply_kernel, 512, 4096, True),
}
json.dump(ptx, sys.stdout)
"""


needs_nvidia_backend = pytest.mark.skipif(
    not kernels.TRITON_AVAILABLE or importlib.util.find_spec("triton.backends.nvidia") is None,
    reason="needs triton with its NVIDIA backend")


def run_json_script(script: str):
    import json

    done = run_python(script)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@needs_nvidia_backend
def test_kernels_compile_for_hopper():
    ptx = run_json_script(HOPPER_COMPILE)
    assert "wgmma" in ptx["attention fp16 D=40"] and "wgmma" in ptx["attention bf16 D=160"]  # Hopper tensor cores
    for name in ("attention fp16 D=40", "attention bf16 D=160", "group norm stats NCHW",
                 "group norm apply channels_last"):
        assert "ld.global.v4" in ptx[name], f"{name}: loads did not vectorise to 16 bytes"



# Every tile the autotuner may try at SD1.5's head dims, compiled for sm_90: the half-precision ones must not spill
# registers (ptxas' stack frame), whatever the pruner's register estimate says.
HOPPER_SPILLS = HOPPER_COMPILE.split("ptx = {")[0] + r"""
import os, subprocess, tempfile
import torch

def kept_tiles(dtype, head_dim, n):
    configs = attention._attention_configs()
    block_d = max(16, triton.next_power_of_2(head_dim))
    kept = attention._prune_attention_configs(configs, {"Q": torch.empty(0, dtype=dtype), "BLOCK_D": block_d,
                                                        "N_Q": n, "N_KV": n})
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]

def stack_bytes(ptx):
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as folder:
        ptx_path, cubin = os.path.join(folder, "k.ptx"), os.path.join(folder, "k.cubin")
        open(ptx_path, "w").write(ptx)
        ptxas = os.path.join(bin_dir, "ptxas")
        if "ptxas-blackwell" in os.listdir(bin_dir) and ".version 9" in ptx:  # newer PTX than the sm_90 ptxas reads
            ptxas = os.path.join(bin_dir, "ptxas-blackwell")
        subprocess.run([ptxas, "-arch=sm_90a", ptx_path, "-o", cubin], check=True)
        usage = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-res-usage", cubin], capture_output=True,
                               text=True, check=True).stdout
    return int(usage.split("STACK:")[1].split()[0])

report = {}
for dtype, name in ((torch.float16, "*fp16"), (torch.float32, "*fp32")):
    for head_dim in (40, 80, 160):
        tiles = kept_tiles(dtype, head_dim, 4096)
        spills = {} if dtype == torch.float32 else {
            str(tile): stack_bytes(attention_ptx(name, 8, 4096, head_dim, tile)) for tile in tiles}
        report[f"{name} D={head_dim}"] = {"tiles": tiles, "spills": spills}
json.dump(report, sys.stdout)
"""


@needs_nvidia_backend
def test_autotuned_attention_tiles_do_not_spill_on_hopper():
    report = run_json_script(HOPPER_SPILLS)
    for case, found in report.items():
        assert found["tiles"], f"{case}: every tile was pruned"
        spilled = {tile: size for tile, size in found["spills"].items() if size}
        assert not spilled, f"{case}: tiles that spill registers (bytes of stack): {spilled}"
    for head_dim in (40, 80, 160):  # float32 keeps only the small tiles that spill least
        assert all(m * n <= 512 and warps >= 4 for m, n, warps, _ in report[f"*fp32 D={head_dim}"]["tiles"])

# ---------------------------------------------------------------------------------------------- GPU only

SD15_ATTENTION = [  # (B, H, Nq, Nk, D): batch 2 for guidance; 512x512 -> 64x64 latents; 768x768 -> 96x96
    (2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40), (2, 8, 1024, 1024, 80), (2, 8, 1024, 77, 80),
    (2, 8, 256, 256, 160), (2, 8, 256, 77, 160), (2, 8, 64, 64, 160), (2, 8, 64, 77, 160),
    (2, 8, 9216, 9216, 40), (2, 8, 9216, 77, 40), (2, 8, 77, 1, 64),
]
SDXL_ATTENTION = [  # SDXL at 1024x1024 -> 128x128 latents: head dim 64, 10 heads at 64x64, 20 heads at 32x32
    (2, 10, 4096, 4096, 64), (2, 10, 4096, 77, 64), (2, 20, 1024, 1024, 64), (2, 20, 1024, 77, 64),
]


# Half precision at every shape (what the model runs); float32, whose tiles run without tensor cores and compile
# slowly, at one shape per head dim.
SD15_ATTENTION_CASES = [(*shape, dtype) for shape in SD15_ATTENTION + SDXL_ATTENTION
                        for dtype in (torch.float16, torch.bfloat16)] + [
    (2, 8, 4096, 77, 40, torch.float32), (2, 8, 1024, 1024, 80, torch.float32), (2, 8, 256, 77, 160, torch.float32)]


@needs_cuda
@needs_triton
@pytest.mark.parametrize("batch,heads,n_q,n_kv,head_dim,dtype", SD15_ATTENTION_CASES)
def test_attention_sd15_and_sdxl_shapes_on_gpu(batch, heads, n_q, n_kv, head_dim, dtype):
    q, k, v = make_qkv(batch, heads, n_q, n_kv, head_dim, "projected", dtype, device="cuda")
    out = torch.full(q.shape, float("nan"), dtype=dtype, device="cuda")
    attention_module.attention_triton(q, k, v, out=out)
    assert_within_twice_torch_error(out, attention_ref(q, k, v), attention_float64(q, k, v, None),
                                    f"attention {dtype} {(batch, heads, n_q, n_kv, head_dim)}")


SD15_GROUP_NORM = [  # (shape, groups): UNet at 512x512 (batch 2) and the VAE decoder's largest maps
    ((2, 320, 64, 64), 32), ((2, 640, 32, 32), 32), ((2, 1280, 8, 8), 32), ((2, 960, 64, 64), 32),
    ((1, 512, 64, 64), 32), ((1, 128, 512, 512), 32), ((1, 256, 256, 256), 32),
    # SDXL at 1024x1024: the UNet's first level and its widest up-block input, the VAE decoder's last level
    ((2, 320, 128, 128), 32), ((2, 960, 128, 128), 32), ((1, 128, 1024, 1024), 32),
]


@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape,groups", SD15_GROUP_NORM)
def test_group_norm_sd15_and_sdxl_shapes_on_gpu(shape, groups, channels_last, dtype):
    x, weight, bias = make_group_norm_inputs(shape, channels_last, True, dtype, device="cuda")
    out = torch.full_like(x, float("nan"))
    group_norm_module.group_norm_triton(x, groups, weight, bias, 1e-5, "silu", out=out)
    assert_within_twice_torch_error(out, group_norm_ref(x, groups, weight, bias, 1e-5, "silu"),
                                    group_norm_float64(x, groups, weight, bias, 1e-5, "silu"),
                                    f"group_norm {dtype} {shape} channels_last={channels_last}")


@needs_cuda
@needs_triton
def test_kernels_replay_inside_a_cuda_graph():
    q, k, v = make_qkv(2, 8, 1024, 77, 80, "projected", torch.float16, device="cuda")
    x, weight, bias = make_group_norm_inputs((2, 320, 32, 32), False, True, torch.float16, device="cuda")
    with kernels.use_kernels("triton"):
        _attention_then_norm(q, k, v, x, 32, weight, bias)  # warm-up: autotunes and compiles outside capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = _attention_then_norm(q, k, v, x, 32, weight, bias)
        for t in (q, k, v, x):  # new inputs in the captured buffers
            t.mul_(0.5)
        graph.replay()
        expected = _attention_then_norm(q, k, v, x, 32, weight, bias)
    for got, want in zip(captured, expected):
        assert torch.equal(got, want)


@needs_cuda
@needs_triton
def test_kernels_compile_as_single_ops_in_a_full_graph():
    q, k, v = make_qkv(2, 8, 256, 77, 160, "projected", torch.float16, device="cuda")
    x, weight, bias = make_group_norm_inputs((2, 320, 16, 16), True, True, torch.float16, device="cuda")
    with kernels.use_kernels("triton"):
        compiled = torch.compile(_attention_then_norm, fullgraph=True)
        results = compiled(q, k, v, x, 32, weight, bias), _attention_then_norm(q, k, v, x, 32, weight, bias)
    for got, want in zip(*results):
        assert torch.allclose(got, want, atol=2e-3, rtol=2e-3)


@needs_triton
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_kernels_run_on_their_inputs_gpu_not_the_current_one():
    q, k, v = make_qkv(1, 2, 64, 77, 40, "projected", torch.float16, device="cuda:1")
    x, weight, bias = make_group_norm_inputs((1, 64, 8, 8), False, True, torch.float16, device="cuda:1")
    with torch.cuda.device(0), kernels.use_kernels("triton"):
        out, y = _attention_then_norm(q, k, v, x, 32, weight, bias)
    torch.cuda.synchronize(1)
    assert torch.allclose(out, attention_ref(q, k, v), atol=2e-3)
    assert torch.allclose(y, group_norm_ref(x, 32, weight, bias, 1e-5, "silu"), atol=2e-3)
