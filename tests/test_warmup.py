"""INPAINT_WARMUP: the worker runs its configured job shapes at start-up, so the first real job finds its graph."""
import pytest
import torch
from PIL import Image

from tests.test_denoise import eager_capture
from worker.inference.denoise import DenoiseRunner
from worker.inference.pipeline import InpaintPipeline
from worker.settings import Settings


def test_warmup_setting_parses_shapes():
    settings = Settings.from_env({"INPAINT_WARMUP": "512x512:50:pndm, 768x512:30::2"})
    assert settings.warmup_shapes == [
        {"width": 512, "height": 512, "num_inference_steps": 50, "scheduler": "pndm"},
        {"width": 768, "height": 512, "num_inference_steps": 30, "batch": 2}]
    assert Settings.from_env({}).warmup_shapes == []


@pytest.mark.parametrize("bad", ["512:50", "512x512", "512x512:50:lms", "512x0:5", "64x64:4:ddim:1:9"])
def test_malformed_warmup_names_the_entry(bad):
    with pytest.raises(ValueError, match="INPAINT_WARMUP entry"):
        Settings.from_env({"INPAINT_WARMUP": bad})


def test_a_job_of_a_warmed_up_shape_does_not_capture_again(tiny_model_dir):
    pipe = InpaintPipeline.from_pretrained(str(tiny_model_dir), device="cpu", dtype=torch.float32)
    pipe.runner = DenoiseRunner(pipe.unet, capture=eager_capture)
    (shape,) = Settings.from_env({"INPAINT_WARMUP": "32x24:3:euler_a"}).warmup_shapes
    pipe.warmup(**shape)
    assert pipe.runner.graphs.captures == 1
    image, mask = Image.new("RGB", (32, 24), (10, 200, 30)), Image.new("L", (32, 24), 255)
    pipe("a real job", image, mask, num_inference_steps=3, scheduler="euler_a", seed=1)
    assert pipe.runner.graphs.captures == 1
