"""The denoise runner's graph cache: keying, reuse across jobs, LRU eviction and the eager fallback.

Real CUDA graphs need a GPU (tests/test_denoise_gpu.py); here the capture is injected: a "graph" whose replay runs
the same step function eagerly on its own static buffers, which exercises everything around the capture.
"""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from worker.inference.denoise import DenoiseRunner, GraphCache, StepState, _Graph, denoise_step, warm_up
from worker.inference.pipeline import InpaintPipeline
from worker.inference.schedulers import SCHEDULERS


class _EagerGraph:
    def __init__(self, replay):
        self.replay = replay


def eager_capture(unet, sampler, inputs, begin):
    """capture_cuda_graph without CUDA: the same reset and warm-up, then a "graph" that runs the step eagerly."""
    sampler.reset(inputs.latents, begin)
    state = StepState(inputs)
    warm_up(unet, sampler, state, begin)
    return _Graph(graph=_EagerGraph(lambda: denoise_step(unet, sampler, state)), state=state, sampler=sampler)


def failing_capture(unet, sampler, inputs, begin):
    raise RuntimeError("operation not permitted when stream is capturing")


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return InpaintPipeline.from_pretrained(str(tiny_model_dir), device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(5)
    image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask = Image.new("L", image.size, 0)
    mask.paste(255, (8, 8, 24, 24))
    return image, mask


def _images(pipe, scene, **kwargs):
    return [np.asarray(i) for i in pipe("a dog", *scene, num_inference_steps=4, seed=3, **kwargs)]


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_replayed_steps_equal_eager_across_jobs(pipe, scene, scheduler):
    eager = pipe.runner
    graphs = DenoiseRunner(pipe.unet, mode="auto", capture=eager_capture)
    jobs = [dict(scheduler=scheduler), dict(scheduler=scheduler, strength=0.5, guidance_scale=3.0),
            dict(scheduler=scheduler)]
    expected = [_images(pipe, scene, **job) for job in jobs]
    pipe.runner = graphs
    try:
        got = [_images(pipe, scene, **job) for job in jobs]
    finally:
        pipe.runner = eager
    for want, have in zip(expected, got):
        assert all(np.array_equal(a, b) for a, b in zip(want, have))
    # One shape: the second and third jobs replay the first capture.
    assert graphs.captures == graphs.graphs.captures == 1



@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_capture_of_a_short_or_late_starting_job_stays_inside_the_tables(pipe, scene, scheduler):
    # The warm-up before a capture runs the step more than once: it must stay at the job's first table index, or
    # a one-step job (or one starting at the last index, strength 0.3 of 4 steps) reads past the tables' end, which
    # on a GPU is a device-side assert that no fallback survives.
    jobs = [dict(num_inference_steps=1), dict(num_inference_steps=4, strength=0.5),
            dict(num_inference_steps=4, strength=0.3)]
    graphs = DenoiseRunner(pipe.unet, capture=eager_capture)
    for job in jobs:
        want = pipe("a dog", *scene, seed=3, scheduler=scheduler, **job)
        eager, pipe.runner = pipe.runner, graphs
        try:
            got = pipe("a dog", *scene, seed=3, scheduler=scheduler, **job)
        finally:
            pipe.runner = eager
        assert np.array_equal(np.asarray(want[0]), np.asarray(got[0])), job
    assert graphs.graphs.captures == 2  # the two 4-step jobs share one graph: the start is read at replay

def test_a_new_shape_or_schedule_captures_again(pipe, scene):
    graphs = DenoiseRunner(pipe.unet, capture=eager_capture)
    eager, pipe.runner = pipe.runner, graphs
    try:
        _images(pipe, scene, scheduler="ddim")
        _images(pipe, scene, scheduler="euler")
        pipe("a dog", *scene, num_inference_steps=5, seed=3, scheduler="ddim")
        pipe("a dog", *scene, num_inference_steps=4, seed=3, scheduler="ddim", num_images_per_prompt=2)
        _images(pipe, scene, scheduler="ddim")
    finally:
        pipe.runner = eager
    assert graphs.graphs.captures == 4


def test_lru_evicts_the_least_recently_used_key():
    captured = []
    cache = GraphCache(2, lambda name: captured.append(name) or name)
    for key in ["a", "b", "a", "c", "b"]:
        cache.get(key, key)
    assert captured == ["a", "b", "c", "b"]  # "b" was evicted when "c" came in, "a" was used more recently
    assert "a" not in cache and "b" in cache and "c" in cache and len(cache) == 2
    with pytest.raises(ValueError, match="max_graphs"):
        GraphCache(0, lambda: None)


def test_capture_failure_falls_back_to_eager_with_one_logged_reason(pipe, scene, caplog):
    expected = _images(pipe, scene, scheduler="pndm")
    eager, pipe.runner = pipe.runner, DenoiseRunner(pipe.unet, mode="auto", capture=failing_capture)
    try:
        with caplog.at_level(logging.WARNING, logger="inpaint.denoise"):
            first = _images(pipe, scene, scheduler="pndm")
            second = _images(pipe, scene, scheduler="pndm")
    finally:
        pipe.runner = eager
    assert all(np.array_equal(a, b) for a, b in zip(expected, first))
    assert all(np.array_equal(a, b) for a, b in zip(expected, second))
    warnings = [r for r in caplog.records if "capture failed" in r.getMessage()]
    assert len(warnings) == 1 and "stream is capturing" in warnings[0].reason


def test_mode_on_surfaces_a_capture_failure(pipe, scene):
    eager, pipe.runner = pipe.runner, DenoiseRunner(pipe.unet, mode="on", capture=failing_capture)
    try:
        with pytest.raises(RuntimeError, match="capturing"):
            _images(pipe, scene)
    finally:
        pipe.runner = eager


def test_graphs_off_and_bad_mode():
    runner = DenoiseRunner(torch.nn.Identity(), mode="off", capture=eager_capture)
    assert not runner.uses_graphs(torch.device("cuda"))
    with pytest.raises(ValueError, match="cuda_graphs"):
        DenoiseRunner(torch.nn.Identity(), mode="sometimes")


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("channels", [9, 4])
def test_the_step_never_reads_a_tensor_back_to_the_host(pipe, scheduler, channels):
    # On the meta device any host read (.item(), bool(), indexing by a tensor) raises: the step must not do one,
    # or it could not be captured in a CUDA graph.
    from worker.inference.denoise import DenoiseInputs
    from worker.inference.model.unet import UNet2DConditionModel, UNetConfig

    config = UNetConfig.from_dict({**pipe.unet.config.__dict__, "in_channels": channels})
    with torch.device("meta"):
        unet = UNet2DConditionModel(config)
        latents = torch.empty(2, 4, 8, 8)
        inputs = DenoiseInputs(
            latents=latents, text=torch.empty(4, 77, 32), guidance_scale=7.5,
            condition=torch.empty(4, 5, 8, 8) if channels == 9 else None,
            step_noise=torch.empty(5, 2, 4, 8, 8) if scheduler in ("euler_a", "ddpm") else None,
            blend=(torch.empty(2, 4, 8, 8), torch.empty(2, 4, 8, 8), torch.empty(2, 1, 8, 8)) if channels == 4
            else None)
    assert two_steps_on_meta(unet, scheduler, pipe.scheduler_config, inputs).shape == (2, 4, 8, 8)


def two_steps_on_meta(unet, scheduler: str, scheduler_config: dict, inputs) -> torch.Tensor:
    """Two denoise steps on the meta device, where any host read of a tensor raises; the final latents."""
    from worker.inference.schedulers import make_sampler

    sampler = make_sampler(scheduler, scheduler_config, 4, "meta")
    sampler.reset(inputs.latents, 0)
    state = StepState(inputs)
    for _ in range(2):
        denoise_step(unet, sampler, state)
    return state.latents


def test_release_memory_drops_the_graphs_and_the_next_job_captures_again(pipe, scene):
    graphs = DenoiseRunner(pipe.unet, capture=eager_capture)
    eager, pipe.runner = pipe.runner, graphs
    try:
        want = _images(pipe, scene)
        pipe.release_memory()
        assert len(graphs.graphs) == 0
        got = _images(pipe, scene)
    finally:
        pipe.runner = eager
    assert graphs.graphs.captures == 2 and len(graphs.graphs) == 1
    assert all(np.array_equal(a, b) for a, b in zip(want, got))



def test_out_of_memory_while_capturing_is_raised_not_held_against_the_shape(pipe, scene):
    attempts = []

    def capture_out_of_memory_once(unet, sampler, inputs, begin):
        attempts.append(begin)
        if len(attempts) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return eager_capture(unet, sampler, inputs, begin)

    eager, pipe.runner = pipe.runner, DenoiseRunner(pipe.unet, mode="auto", capture=capture_out_of_memory_once)
    try:
        with pytest.raises(torch.OutOfMemoryError):
            _images(pipe, scene)
        pipe.release_memory()
        _images(pipe, scene)  # captured this time, not run eagerly for good
    finally:
        pipe.runner, runner = eager, pipe.runner
    assert len(attempts) == 2 and len(runner.graphs) == 1


@pytest.fixture(scope="module")
def sdxl_pipe(tmp_path_factory):
    from worker.inference.model.tiny import write_tiny_model

    folder = write_tiny_model(tmp_path_factory.mktemp("tiny-sdxl"), family="sdxl")
    return InpaintPipeline.from_pretrained(str(folder), device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("scheduler", ["euler", "euler_a", "dpmpp_2m"])
def test_sdxl_pooled_text_is_refilled_at_every_replay(sdxl_pipe, scene, scheduler):
    # Three jobs of one shape with other pooled embeddings (zeroed, encoded negatives): one capture, eager's pixels.
    jobs = [dict(prompt="a dog"), dict(prompt="a red cat", negative_prompt="blurry"), dict(prompt="a dog",
                                                                                          negative_prompt="")]
    expected = [sdxl_pipe(job.pop("prompt"), *scene, num_inference_steps=3, seed=3, scheduler=scheduler, **job)
                for job in [dict(j) for j in jobs]]
    graphs = DenoiseRunner(sdxl_pipe.unet, capture=eager_capture)
    eager, sdxl_pipe.runner = sdxl_pipe.runner, graphs
    try:
        got = [sdxl_pipe(job.pop("prompt"), *scene, num_inference_steps=3, seed=3, scheduler=scheduler, **job)
               for job in [dict(j) for j in jobs]]
    finally:
        sdxl_pipe.runner = eager
    for want, have in zip(expected, got):
        assert np.array_equal(np.asarray(want[0]), np.asarray(have[0]))
    assert not np.array_equal(np.asarray(expected[0][0]), np.asarray(expected[2][0]))  # None and "" differ
    assert graphs.graphs.captures == 1


def test_sdxl_time_ids_are_refilled_at_replay(sdxl_pipe):
    from worker.inference.denoise import DenoiseInputs
    from worker.inference.schedulers import make_sampler

    gen = torch.Generator().manual_seed(0)
    shared = dict(latents=torch.randn(1, 4, 8, 8, generator=gen), text=torch.randn(2, 77, 64, generator=gen),
                  condition=torch.randn(2, 5, 8, 8, generator=gen), guidance_scale=5.0, step_noise=None, blend=None,
                  text_embeds=torch.randn(2, 32, generator=gen))
    jobs = [DenoiseInputs(**shared, time_ids=torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 2)),
            DenoiseInputs(**shared, time_ids=torch.tensor([[1024.0, 768.0, 64.0, 0.0, 16.0, 16.0]] * 2))]
    sampler = make_sampler("euler", sdxl_pipe.scheduler_config, 3, "cpu")
    eager = [DenoiseRunner(sdxl_pipe.unet, mode="off").run(sampler, job, 0) for job in jobs]
    graphs = DenoiseRunner(sdxl_pipe.unet, capture=eager_capture)
    replayed = [graphs.run(sampler, job, 0) for job in jobs]
    assert all(torch.equal(a, b) for a, b in zip(eager, replayed))
    assert not torch.equal(eager[0], eager[1]) and graphs.graphs.captures == 1


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_the_sdxl_step_never_reads_a_tensor_back_to_the_host(sdxl_pipe, scheduler):
    from worker.inference.denoise import DenoiseInputs
    from worker.inference.model.unet import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(sdxl_pipe.unet.config)
        latents = torch.empty(2, 4, 8, 8)
        inputs = DenoiseInputs(
            latents=latents, text=torch.empty(4, 77, 64), guidance_scale=7.5, condition=torch.empty(4, 5, 8, 8),
            step_noise=torch.empty(5, 2, 4, 8, 8) if scheduler in ("euler_a", "ddpm") else None, blend=None,
            text_embeds=torch.empty(4, 32), time_ids=torch.empty(4, 6))
    assert two_steps_on_meta(unet, scheduler, sdxl_pipe.scheduler_config, inputs).shape == (2, 4, 8, 8)
