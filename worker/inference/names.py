"""The names and bounds the inference library accepts, defined once. Stdlib only: the service's settings (which the
torch-free GPU supervisor reads) import them from here, the library modules (schedulers, pipeline, denoise runner,
loader, kernels) too.

api_client.schema, which must not import the library, keeps its own copies of SCHEDULERS and MAX_SEED;
tests/test_schema.py pins them equal to these.
"""

__all__ = ["SCHEDULERS", "MAX_SEED", "GRAPH_MODES", "KERNEL_MODES", "DTYPES", "dtype_key"]

SCHEDULERS = ("pndm", "ddim", "ddpm", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras")

# Image i of a prompt uses seed + i, at most MAX_SEED.
MAX_SEED = 2**63 - 1

# The denoise loop as CUDA-graph replay (INPAINT_CUDA_GRAPHS, InpaintPipeline(cuda_graphs=...)).
GRAPH_MODES = ("auto", "on", "off")

# Which attention/GroupNorm kernels run (INPAINT_KERNELS, kernels.use_kernels).
KERNEL_MODES = ("auto", "triton", "torch")

# Every accepted dtype spelling -> the name of its torch dtype (an attribute of torch). Looked up by dtype_key.
DTYPES = {"float16": "float16", "fp16": "float16", "half": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float32": "float32", "fp32": "float32", "float": "float32"}


def dtype_key(name: str) -> str:
    """A dtype name as DTYPES is keyed: any case, with or without torch's `torch.` prefix."""
    return name.strip().lower().removeprefix("torch.")
