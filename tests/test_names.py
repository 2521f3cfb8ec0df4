"""Names and bounds defined once (worker/inference/names.py) and imported: scheduler names, MAX_SEED, graph modes,
kernel modes, dtype names. api_client.schema's copies (it must not import the library) are pinned equal here."""
import ast

import pytest
import torch

import kernels
from api_client import schema
from tests.test_imports import MODULES
from worker.inference import names
from worker.inference.denoise import DenoiseRunner
from worker.inference.model.loader import resolve_dtype
from worker.settings import Settings

# The modules allowed to spell each list or bound out: its home, and schema's pinned copy.
HOMES = {names.SCHEDULERS: {"worker.inference.names", "api_client.schema"},
         names.GRAPH_MODES: {"worker.inference.names"},
         names.KERNEL_MODES: {"worker.inference.names"},
         "2 ** 63 - 1": {"worker.inference.names", "api_client.schema"}}


def spelled_out(module: str) -> set:
    """The lists and bounds of HOMES that `module` writes as literals."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Tuple) and all(isinstance(e, ast.Constant) for e in node.elts):
            found.add(tuple(e.value for e in node.elts))
        elif isinstance(node, ast.BinOp):
            found.add(ast.unparse(node))
    return found & set(HOMES)


def test_each_list_and_bound_is_spelled_out_only_at_home():
    places = {key: {m for m in MODULES if key in spelled_out(m)} for key in HOMES}
    assert places == HOMES


def test_schema_copies_equal_the_library_names():
    assert schema.SCHEDULERS == names.SCHEDULERS
    assert schema.MAX_SEED == names.MAX_SEED


def test_settings_runner_and_kernels_take_the_same_modes():
    for mode in names.GRAPH_MODES:
        assert Settings(cuda_graphs=mode.upper()).cuda_graphs == DenoiseRunner(None, mode=mode).mode == mode
    for mode in names.KERNEL_MODES:
        assert Settings(kernels=mode).kernels == mode
        with kernels.use_kernels(mode):
            assert kernels.kernel_mode() == mode
    with pytest.raises(ValueError, match="INPAINT_CUDA_GRAPHS"):
        Settings(cuda_graphs="always")
    with pytest.raises(ValueError, match="cuda_graphs"):
        DenoiseRunner(None, mode="always")
    with pytest.raises(ValueError, match="INPAINT_KERNELS"):
        Settings(kernels="cuda")
    with pytest.raises(ValueError, match="INPAINT_KERNELS"), kernels.use_kernels("cuda"):
        pass


@pytest.mark.parametrize("spelling", [*names.DTYPES, "HALF", "torch.bfloat16", "Float32"])
def test_settings_and_loader_accept_the_same_dtype_names(spelling):
    settings = Settings.from_env({"INPAINT_DTYPE": spelling})
    expected = getattr(torch, names.DTYPES[names.dtype_key(spelling)])
    assert resolve_dtype(spelling, torch.device("cpu")) == resolve_dtype(settings.dtype, torch.device("cpu")) \
        == expected


@pytest.mark.parametrize("spelling", ["int8", "float64", "double", "fp8"])
def test_settings_and_loader_refuse_the_same_dtype_names(spelling):
    with pytest.raises(ValueError, match="INPAINT_DTYPE"):
        Settings.from_env({"INPAINT_DTYPE": spelling})
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype(spelling, torch.device("cpu"))
