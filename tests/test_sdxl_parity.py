"""Seed parity with diffusers' StableDiffusionXLInpaintPipeline (DESIGN §2 and §9) on tiny random SDXL models.

As for SD1.5 (tests/test_pipeline_parity.py, whose helpers this reuses): the UNet and VAE are built by diffusers from
the tiny SDXL configs, the folder is loaded from disk by both sides, and every pixel must agree within 3/255.
"""
import json
import shutil

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from tests.test_pipeline_parity import _assert_close, _diffusers_scheduler, _scene  # noqa: E402
from worker.inference.model.tiny import sdxl_unet_config, vae_config, write_tiny_model  # noqa: E402
from worker.inference.pipeline import InpaintPipeline  # noqa: E402
from worker.inference.schedulers import SCHEDULERS  # noqa: E402

# (UNet input channels, requires_aesthetics_score, VAE downsampling)
VARIANTS = {"inpaint": (9, False, 2), "plain": (4, False, 2), "aesthetic": (9, True, 2), "sd-vae": (9, False, 8)}


def _save_diffusers_sdxl(folder, in_channels: int, aesthetic: bool, vae_scale: int):
    """Our tiny SDXL folder (tokenizers, text encoders, scheduler) with diffusers-built UNet and VAE."""
    write_tiny_model(folder, in_channels=in_channels, family="sdxl", requires_aesthetics_score=aesthetic,
                     vae_scale=vae_scale)
    torch.manual_seed(1)
    unet = diffusers.UNet2DConditionModel.from_config(sdxl_unet_config(in_channels, aesthetic))
    vae = diffusers.AutoencoderKL.from_config(vae_config(vae_scale, "sdxl"))
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def sdxl_models(tmp_path_factory):
    return {name: _save_diffusers_sdxl(tmp_path_factory.mktemp(f"sdxl-{name}"), *variant)
            for name, variant in VARIANTS.items()}


def _load_both(folder):
    ours = InpaintPipeline.from_pretrained(str(folder), device="cpu", dtype=torch.float32)
    theirs = diffusers.StableDiffusionXLInpaintPipeline.from_pretrained(str(folder), add_watermarker=False)
    theirs.set_progress_bar_config(disable=True)
    return ours, theirs


@pytest.fixture(scope="module")
def sdxl_pipelines(sdxl_models):
    return {name: _load_both(folder) for name, folder in sdxl_models.items()}


def _compare(pair, scheduler: str | None, size=(48, 40), prompt="a red house", per_prompt: int = 1, seed: int = 7,
             steps: int = 4, strength: float = 1.0, **kwargs):
    ours, theirs = pair
    image, mask = _scene(*size)
    # None means the model's own scheduler: SDXL inpainting's EulerDiscrete with "leading" spacing.
    theirs.scheduler = _diffusers_scheduler(scheduler or "euler", ours.scheduler_config)
    prompts = [prompt] if isinstance(prompt, str) else prompt
    generators = [torch.Generator("cpu").manual_seed(seed + i) for _ in prompts for i in range(per_prompt)]
    common = dict(num_inference_steps=steps, height=size[1], width=size[0], strength=strength, **kwargs)
    expected = theirs(prompt=prompt, image=image, mask_image=mask, generator=generators,
                      num_images_per_prompt=per_prompt, **common).images
    got = ours(prompt, image, mask, scheduler=scheduler, seed=seed, num_images_per_prompt=per_prompt, **common)
    _assert_close(got, expected)
    return got


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_matches_diffusers_sdxl(sdxl_pipelines, scheduler):
    _compare(sdxl_pipelines["inpaint"], scheduler)


def test_model_default_scheduler_is_sdxl_euler_leading(sdxl_pipelines):
    ours, _ = sdxl_pipelines["inpaint"]
    assert ours.default_scheduler == "euler" and ours.scheduler_config["timestep_spacing"] == "leading"
    _compare(sdxl_pipelines["inpaint"], None, steps=5)


@pytest.mark.parametrize("scheduler", ["euler", "euler_a", "dpmpp_2m"])
def test_four_channel_sdxl_blends_latents_like_diffusers(sdxl_pipelines, scheduler):
    _compare(sdxl_pipelines["plain"], scheduler)


@pytest.mark.parametrize("variant,scheduler", [("inpaint", "ddim"), ("inpaint", "euler_a"), ("plain", "ddpm"),
                                               ("inpaint", "dpmpp_2m_karras")])
def test_strength_below_one_matches_diffusers_sdxl(sdxl_pipelines, variant, scheduler):
    _compare(sdxl_pipelines[variant], scheduler, strength=0.6, steps=5)


@pytest.mark.parametrize("guidance", [1.0, 0.0, 9.0])
def test_guidance_on_and_off_sdxl(sdxl_pipelines, guidance):
    _compare(sdxl_pipelines["inpaint"], "ddim", guidance_scale=guidance)


def test_negative_prompt_none_and_empty_differ_and_both_match_diffusers(sdxl_pipelines):
    # force_zeros_for_empty_prompt (the model's default): None zeroes the negative embeddings, "" encodes "".
    zeroed = _compare(sdxl_pipelines["inpaint"], "euler", negative_prompt=None)
    encoded = _compare(sdxl_pipelines["inpaint"], "euler", negative_prompt="")
    assert np.abs(np.asarray(zeroed[0], dtype=np.int16) - np.asarray(encoded[0], dtype=np.int16)).max() > 3


def test_negative_prompt_none_is_empty_without_force_zeros(sdxl_models, tmp_path):
    folder = shutil.copytree(sdxl_models["inpaint"], tmp_path / "no-zeros")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"force_zeros_for_empty_prompt": False}))
    pair = _load_both(folder)
    assert pair[0].family.force_zeros_for_empty_prompt is False
    unset = _compare(pair, "euler", negative_prompt=None)
    empty = _compare(pair, "euler", negative_prompt="")
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(unset, empty))


def test_batches_of_prompts_and_images_per_prompt_sdxl(sdxl_pipelines):
    _compare(sdxl_pipelines["inpaint"], "euler_a", prompt=["a red house", "a blue lake"], per_prompt=2,
             negative_prompt=["blurry", "dark"], steps=3)
    # negative_prompt None with a batch: the zeroed negatives sit in front of all four prompts' rows
    _compare(sdxl_pipelines["inpaint"], "dpmpp_2m", prompt=["a red house", "a blue lake"], per_prompt=2, steps=3)


def test_aesthetic_score_time_ids_match_diffusers(sdxl_pipelines):
    ours, _ = sdxl_pipelines["aesthetic"]
    assert ours.family.requires_aesthetics_score and ours.family.time_ids == 5
    _compare(sdxl_pipelines["aesthetic"], "euler", negative_prompt="blurry")
    _compare(sdxl_pipelines["aesthetic"], "ddim", strength=0.6, steps=5)


def test_odd_latent_sizes_and_non_square_sdxl(sdxl_pipelines):
    # diffusers' SDXL pipeline wants multiples of 8: with SD's VAE factor, 72x56 pixels -> 9x7 latents, which the UNet
    # upsamples back to its skips' odd sizes; the time ids carry the processing size, (56, 72, 0, 0, 56, 72).
    _compare(sdxl_pipelines["sd-vae"], "euler", size=(72, 56), steps=3)
    _compare(sdxl_pipelines["plain"], "dpmpp_2m_karras", size=(64, 32), negative_prompt="blurry, low quality")


def test_padding_mask_crop_matches_diffusers_sdxl(sdxl_pipelines):
    _compare(sdxl_pipelines["inpaint"], "euler", size=(64, 48), padding_mask_crop=4)
