"""Real CUDA graphs on a GPU: replay equals eager for every scheduler, and a second job does not capture again."""
import numpy as np
import pytest
import torch
from PIL import Image

from worker.inference.denoise import DenoiseRunner
from worker.inference.pipeline import InpaintPipeline
from worker.inference.schedulers import SCHEDULERS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def pipes(tiny_model_dir):
    eager = InpaintPipeline.from_pretrained(str(tiny_model_dir), device="cuda", dtype=torch.float16,
                                            cuda_graphs="off")
    graphs = InpaintPipeline.from_pretrained(str(tiny_model_dir), device="cuda", dtype=torch.float16,
                                             cuda_graphs="on")
    return eager, graphs


def _scene():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", image.size, 0)
    mask.paste(255, (16, 16, 48, 48))
    return image, mask


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_graph_replay_equals_eager(pipes, scheduler):
    eager, graphs = pipes
    image, mask = _scene()
    kwargs = dict(num_inference_steps=6, seed=4, scheduler=scheduler)
    want = np.asarray(eager("a boat", image, mask, **kwargs)[0], dtype=np.int16)
    captures = graphs.runner.graphs.captures
    for _ in range(2):
        got = np.asarray(graphs("a boat", image, mask, **kwargs)[0], dtype=np.int16)
        assert np.abs(got - want).max() <= 3
    assert graphs.runner.graphs.captures == captures + 1



@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_capture_of_one_step_and_late_starting_jobs(pipes, scheduler):
    # the warm-up before capture must not index past the tables (a device-side assert would poison the process)
    eager, graphs = pipes
    image, mask = _scene()
    for job in (dict(num_inference_steps=1), dict(num_inference_steps=4, strength=0.3)):
        want = np.asarray(eager("a boat", image, mask, seed=4, scheduler=scheduler, **job)[0], dtype=np.int16)
        got = np.asarray(graphs("a boat", image, mask, seed=4, scheduler=scheduler, **job)[0], dtype=np.int16)
        assert np.abs(got - want).max() <= 3, job

def test_eager_runner_has_no_graphs(pipes):
    eager, _ = pipes
    assert isinstance(eager.runner, DenoiseRunner) and len(eager.runner.graphs) == 0
