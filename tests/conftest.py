"""Shared test set-up.

Triton kernels run under the interpreter on machines without CUDA; the variable must be set before anything
imports triton, so it is set here, at collection time.
"""
import os
import shutil

import pytest

# An NVIDIA driver shows as nvidia-smi on the PATH or, in containers that lack it, as its device node.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and shutil.which("nvidia-smi") is None \
        and not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random 9-channel inpainting model written by our own code, shared by the whole session."""
    from worker.inference.model.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"), in_channels=9, seed=0)
