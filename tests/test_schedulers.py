"""The samplers against diffusers' schedulers (the parity oracle), and the rules the CUDA-graph loop relies on."""
import inspect

import diffusers
import pytest
import torch

from worker.inference.schedulers import SCHEDULERS, make_sampler, scheduler_name_for_config

SD15_INPAINTING = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                   "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
                   "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}

DIFFUSERS_CLASSES = {"pndm": ("PNDMScheduler", {}), "ddim": ("DDIMScheduler", {}), "ddpm": ("DDPMScheduler", {}),
                     "euler": ("EulerDiscreteScheduler", {}), "euler_a": ("EulerAncestralDiscreteScheduler", {}),
                     "dpmpp_2m": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": False}),
                     "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True})}

SHAPE = (2, 4, 8, 8)


def _reference(name: str, config: dict, steps: int):
    class_name, overrides = DIFFUSERS_CLASSES[name]
    scheduler = getattr(diffusers, class_name).from_config(config, **overrides)
    scheduler.set_timesteps(steps)
    return scheduler


def _compare_with_diffusers(name: str, config: dict, steps: int, begin_fraction: float = 0.0,
                            begin: int | None = None, dtype: torch.dtype = torch.float32) -> None:
    """Run diffusers' loop and ours side by side, as the inpaint pipeline drives them, and compare every value."""
    reference = _reference(name, config, steps)
    sampler = make_sampler(name, config, steps, "cpu")
    torch.testing.assert_close(sampler.timesteps, reference.timesteps.to(torch.float32), rtol=0, atol=0)
    assert sampler.num_steps == len(reference.timesteps)
    assert isinstance(sampler.init_noise_sigma, float)
    assert sampler.init_noise_sigma == float(reference.init_noise_sigma)
    assert sampler.order == reference.order
    if begin is None:
        begin = int((sampler.num_steps - 1) * begin_fraction)
    if hasattr(reference, "set_begin_index"):
        reference.set_begin_index(begin)  # as the pipeline's get_timesteps does, for every strength

    data = torch.Generator().manual_seed(0)
    model_outputs = torch.randn((sampler.num_steps, *SHAPE), generator=data, dtype=dtype)
    image, noise = torch.randn(SHAPE, generator=data, dtype=dtype), torch.randn(SHAPE, generator=data, dtype=dtype)
    # In float32 add_noise must equal diffusers' exactly and steps agree to rounding (today they are bit-equal
    # too); in half precision diffusers rounds some scalars to half where we keep them in float32.
    exact = {"rtol": 0, "atol": 0} if dtype == torch.float32 else {"rtol": 2e-3, "atol": 2e-3}
    close = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-3, "atol": 2e-3}
    if begin > 0:
        expected = reference.add_noise(image, noise, reference.timesteps[begin:begin + 1])
        torch.testing.assert_close(sampler.add_noise(image, noise, begin), expected, **exact)
        theirs = expected
    else:
        theirs = noise * reference.init_noise_sigma
    ours = theirs.clone()
    sampler.reset(ours, begin)

    takes_generator = "generator" in inspect.signature(reference.step).parameters
    their_generator, our_generator = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    index = torch.tensor(begin)  # one index tensor, advanced in place, as in the CUDA-graph loop
    for i in range(begin, sampler.num_steps):
        t = reference.timesteps[i]
        assert sampler.timestep(index) == t
        torch.testing.assert_close(sampler.scale_model_input(ours, index), reference.scale_model_input(theirs, t),
                                   **close)
        kwargs = {"generator": their_generator} if takes_generator else {}
        theirs = reference.step(model_outputs[i], t, theirs, **kwargs).prev_sample
        step_noise = torch.randn(SHAPE, generator=our_generator, dtype=dtype) if sampler.draws_noise(i) else None
        ours = sampler.step(model_outputs[i], ours, index, noise=step_noise)
        assert ours.dtype == theirs.dtype == dtype
        torch.testing.assert_close(ours, theirs, **close, msg=lambda m: f"step {i}: {m}")
        if i + 1 < sampler.num_steps:  # 4-channel UNets blend the image noised to the next step's level
            expected = reference.add_noise(image, noise, reference.timesteps[i + 1:i + 2])
            torch.testing.assert_close(sampler.add_noise(image, noise, index + 1), expected, **exact)
        index.add_(1)
    # the ancestral samplers consumed exactly the draws diffusers consumed
    assert torch.equal(torch.randn(1, generator=their_generator), torch.randn(1, generator=our_generator))


@pytest.mark.parametrize("begin_fraction", [0.0, 0.5], ids=["strength1", "strength<1"])
@pytest.mark.parametrize("steps", [1, 4, 10, 25])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_matches_diffusers_epsilon(name, steps, begin_fraction):
    _compare_with_diffusers(name, SD15_INPAINTING, steps, begin_fraction)


@pytest.mark.parametrize("begin_fraction", [0.0, 0.7])
@pytest.mark.parametrize("steps", [4, 25])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_matches_diffusers_v_prediction(name, steps, begin_fraction):
    _compare_with_diffusers(name, {**SD15_INPAINTING, "prediction_type": "v_prediction"}, steps, begin_fraction)


OTHER_CONFIGS = {
    "bare-defaults": {},
    "trailing": {**SD15_INPAINTING, "timestep_spacing": "trailing"},
    "linspace": {**SD15_INPAINTING, "timestep_spacing": "linspace"},
    "leading": {**SD15_INPAINTING, "timestep_spacing": "leading"},
    "cosine": {**SD15_INPAINTING, "beta_schedule": "squaredcos_cap_v2"},
    "zero-snr": {**SD15_INPAINTING, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                 "prediction_type": "v_prediction"},
    "trained-betas": {**SD15_INPAINTING, "trained_betas": torch.linspace(1e-4, 0.02, 1000).tolist()},
    "alpha-to-one-clip-offset0": {**SD15_INPAINTING, "set_alpha_to_one": True, "clip_sample": True,
                                  "steps_offset": 0},
    "sigma-min-final": {**SD15_INPAINTING, "final_sigmas_type": "sigma_min"},
    "karras-config": {**SD15_INPAINTING, "use_karras_sigmas": True},
    "karras-sigma-range": {**SD15_INPAINTING, "use_karras_sigmas": True, "sigma_min": 0.5, "sigma_max": 10.0},
    "dpm-options": {**SD15_INPAINTING, "solver_type": "heun", "lower_order_final": False, "euler_at_final": True},
    "dpm-first-order": {**SD15_INPAINTING, "solver_order": 1},
    "ddpm-large-variance": {**SD15_INPAINTING, "variance_type": "fixed_large"},
    "ddpm-small-log-variance": {**SD15_INPAINTING, "variance_type": "fixed_small_log"},
}


@pytest.mark.parametrize("config", list(OTHER_CONFIGS), ids=list(OTHER_CONFIGS))
@pytest.mark.parametrize("name", SCHEDULERS)
def test_matches_diffusers_for_other_configs(name, config):
    """Keys a config sets, and the defaults each class takes for keys it lacks, resolve as in from_config."""
    _compare_with_diffusers(name, OTHER_CONFIGS[config], 10, 0.4)


def test_resolved_defaults_are_those_of_the_diffusers_classes():
    from worker.inference.schedulers import _DEFAULTS

    for class_name, defaults in _DEFAULTS.items():
        parameters = inspect.signature(getattr(diffusers, class_name).__init__).parameters
        for key, value in defaults.items():
            assert key in parameters, f"{class_name} has no parameter {key}"
            assert parameters[key].default == value, f"{class_name}.{key}"


@pytest.mark.parametrize("final_sigma", ["zero", "sigma_min"])
def test_lower_order_final_step_of_dpm_solver_follows_diffusers(final_sigma):
    """A last step to sigma 0 is always first order; to sigma_min only with lower_order_final and < 15 steps."""
    for steps in (14, 15, 16):
        _compare_with_diffusers("dpmpp_2m", {**SD15_INPAINTING, "final_sigmas_type": final_sigma}, steps)


def test_ddpm_draws_noise_only_while_t_is_positive():
    sampler = make_sampler("ddpm", {**SD15_INPAINTING, "steps_offset": 0}, 5, "cpu")
    assert [sampler.draws_noise(i) for i in range(5)] == [True, True, True, True, False]
    assert sampler.timesteps[-1] == 0
    euler_a, euler = (make_sampler(n, SD15_INPAINTING, 5, "cpu") for n in ("euler_a", "euler"))
    assert all(euler_a.draws_noise(i) for i in range(5)) and not any(euler.draws_noise(i) for i in range(5))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_pndm_runge_kutta_warm_up_matches_diffusers_from_every_start(prediction_type):
    """Without skip_prk_steps PNDM runs 12 Runge-Kutta stages first; strength < 1 starts anywhere in them."""
    config = {key: value for key, value in SD15_INPAINTING.items() if key != "skip_prk_steps"}
    config["prediction_type"] = prediction_type
    for begin in range(5):
        _compare_with_diffusers("pndm", config, 5, begin=begin)


def test_pndm_has_one_timestep_more_than_steps():
    sampler = make_sampler("pndm", SD15_INPAINTING, 10, "cpu")
    assert sampler.num_steps == 11
    assert sampler.timesteps[:3].tolist() == [901.0, 801.0, 801.0]


@pytest.mark.parametrize("name", SCHEDULERS)
def test_a_second_job_on_the_same_buffers_repeats_the_first(name):
    """Graph replay: the same sampler, index tensor and buffers serve job after job; reset zeroes, never rebinds."""
    sampler = make_sampler(name, SD15_INPAINTING, 6, "cpu")
    data = torch.Generator().manual_seed(3)
    outputs = torch.randn((sampler.num_steps, *SHAPE), generator=data)
    noises = torch.randn((sampler.num_steps, *SHAPE), generator=data)
    start = torch.randn(SHAPE, generator=data)
    latents, index = start.clone(), torch.zeros((), dtype=torch.int64)

    def run_job(begin: int) -> torch.Tensor:
        latents.copy_(start)
        sampler.reset(latents, begin)
        index.fill_(begin)
        for _ in range(begin, sampler.num_steps):
            latents.copy_(sampler.step(outputs[index.tolist()], latents, index, noise=noises[index.tolist()]))
            index.add_(1)
        return latents.clone()

    first = run_job(0)
    buffers = {key: tensor.data_ptr() for key, tensor in sampler._buffers.items()}
    run_job(2)
    assert {key: tensor.data_ptr() for key, tensor in sampler._buffers.items()} == buffers
    torch.testing.assert_close(run_job(0), first, rtol=0, atol=0)
    sampler.reset(torch.zeros(1, 4, 8, 8), 0)  # a new shape gets new buffers
    assert all(sampler._buffers[key].shape == (1, 4, 8, 8) for key in buffers)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_per_step_functions_never_sync_with_the_host(name):
    """On the meta device every value read (.item(), bool(), indexing by a tensor) raises; ours never reads one."""
    sampler = make_sampler(name, SD15_INPAINTING, 10, "meta")
    sample = torch.empty(SHAPE, device="meta")
    index = torch.tensor(3, device="meta")
    with pytest.raises(RuntimeError):
        sampler.timesteps[index]  # what the check catches: tensor indexing reads the index on the host
    sampler.reset(sample, 3)
    scaled = sampler.scale_model_input(sample, index)
    previous = sampler.step(scaled, sample, index, noise=torch.empty(SHAPE, device="meta"))
    noised = sampler.add_noise(sample, sample, index + 1)
    assert previous.shape == noised.shape == SHAPE and sampler.timestep(index).shape == ()


@pytest.mark.parametrize("name", SCHEDULERS)
def test_half_precision_matches_diffusers(name):
    _compare_with_diffusers(name, SD15_INPAINTING, 10, 0.3, dtype=torch.float16)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_each_image_of_a_batch_steps_as_it_would_alone(name):
    """Seed parity across batch sizes: nothing in a step mixes the images of a batch."""
    data = torch.Generator().manual_seed(4)
    outputs, noises, start = (torch.randn((4, *SHAPE), generator=data) for _ in range(3))

    def run(rows: slice) -> torch.Tensor:
        sampler = make_sampler(name, SD15_INPAINTING, 4, "cpu")
        latents, index = start[0][rows].clone(), torch.tensor(0)
        sampler.reset(latents, 0)
        for i in range(4):
            latents = sampler.step(outputs[i][rows], latents, index, noise=noises[i][rows])
            index.add_(1)
        return latents

    torch.testing.assert_close(run(slice(1, 2)), run(slice(None))[1:2], rtol=0, atol=0)


def test_scheduler_name_for_config():
    names = {"PNDMScheduler": "pndm", "DDIMScheduler": "ddim", "DDPMScheduler": "ddpm",
             "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_a",
             "DPMSolverMultistepScheduler": "dpmpp_2m"}
    for class_name, name in names.items():
        assert scheduler_name_for_config({"_class_name": class_name}) == name
    karras = {"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}
    assert scheduler_name_for_config(karras) == "dpmpp_2m_karras"
    with pytest.raises(ValueError, match="LMSDiscreteScheduler"):
        scheduler_name_for_config({"_class_name": "LMSDiscreteScheduler"})


def test_dpmpp_2m_ignores_karras_in_the_config_and_karras_forces_it():
    config = {**SD15_INPAINTING, "_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}
    plain = make_sampler("dpmpp_2m", config, 10, "cpu")
    torch.testing.assert_close(plain.timesteps, make_sampler("dpmpp_2m", SD15_INPAINTING, 10, "cpu").timesteps)
    _compare_with_diffusers("dpmpp_2m_karras", SD15_INPAINTING, 10, 0.0)


@pytest.mark.parametrize("arguments, message", [
    (("lms", SD15_INPAINTING, 10), "scheduler: 'lms' is not one of pndm, ddim"),
    (("ddim", SD15_INPAINTING, 0), "num_inference_steps: 0 must be an integer from 1 to 1000"),
    (("ddim", SD15_INPAINTING, 1001), "num_inference_steps: 1001"),
    (("ddim", SD15_INPAINTING, 2.5), "num_inference_steps: 2.5"),
    (("ddpm", SD15_INPAINTING, 1000), "num_inference_steps: 1000 with steps_offset 1 gives timestep 1000"),
    (("ddim", {**SD15_INPAINTING, "prediction_type": "sample"}, 10), "prediction_type='sample' is not supported"),
    (("pndm", {"_class_name": "DDIMScheduler"}, 3), "num_inference_steps: 3 is too few for pndm"),
    (("dpmpp_2m", {"algorithm_type": "sde-dpmsolver++"}, 10), "algorithm_type='sde-dpmsolver\\+\\+'"),
    (("ddpm", {"variance_type": "learned_range"}, 10), "variance_type='learned_range'"),
    (("euler", {"beta_schedule": "cubic"}, 10), "beta_schedule='cubic'"),
    (("euler", None, 10), "scheduler config: expected a dict"),
])
def test_bad_arguments_are_named(arguments, message):
    with pytest.raises(ValueError, match=message):
        make_sampler(*arguments, "cpu")


def test_bad_dtype_begin_index_and_missing_noise_are_named():
    with pytest.raises(ValueError, match="dtype"):
        make_sampler("ddim", SD15_INPAINTING, 10, "cpu", dtype=torch.int64)
    sampler = make_sampler("euler_a", SD15_INPAINTING, 10, "cpu")
    sample = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="begin: 10 must be an integer from 0 to 9"):
        sampler.reset(sample, 10)
    with pytest.raises(ValueError, match="i: -1 must be an integer index from 0 to 9"):
        sampler.add_noise(sample, sample, -1)
    sampler.reset(sample, 0)
    with pytest.raises(ValueError, match="noise: euler_a"):
        sampler.step(sample, sample, torch.tensor(0))
    with pytest.raises(RuntimeError, match="reset"):
        make_sampler("pndm", SD15_INPAINTING, 10, "cpu").step(sample, sample, torch.tensor(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", SCHEDULERS)
def test_cuda_graph_replay_equals_eager(name):
    device = torch.device("cuda")
    sampler = make_sampler(name, SD15_INPAINTING, 8, device)
    data = torch.Generator().manual_seed(2)
    outputs = torch.randn((sampler.num_steps, *SHAPE), generator=data).to(device)
    noises = torch.randn((sampler.num_steps, *SHAPE), generator=data).to(device)
    start = torch.randn(SHAPE, generator=data).to(device)
    image = torch.randn(SHAPE, generator=data).to(device)
    latents, index = start.clone(), torch.zeros((), dtype=torch.int64, device=device)
    output, noise, scaled = torch.empty_like(start), torch.empty_like(start), torch.empty_like(start)
    last = sampler.num_steps - 1

    def step():  # the sampler's part of the denoise step, with a 4-channel blend
        scaled.copy_(sampler.scale_model_input(latents, index))
        x = sampler.step(output, latents, index, noise=noise)
        latents.copy_(0.5 * x + 0.5 * sampler.add_noise(image, noise, torch.clamp(index + 1, max=last)))
        index.add_(1)

    def step_checking_syncs():
        torch.cuda.set_sync_debug_mode("error")  # any host sync inside raises
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def run(advance) -> tuple[torch.Tensor, torch.Tensor]:
        latents.copy_(start)
        sampler.reset(latents, 1)
        index.fill_(1)
        for i in range(1, sampler.num_steps):
            output.copy_(outputs[i])
            noise.copy_(noises[i])
            advance()
        torch.cuda.synchronize()
        return latents.clone(), scaled.clone()

    eager = run(step_checking_syncs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run(step)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    replayed = run(graph.replay)
    torch.testing.assert_close(replayed, eager, rtol=0, atol=0)
