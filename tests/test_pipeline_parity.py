"""Seed parity with diffusers' StableDiffusionInpaintPipeline (DESIGN §2).

Tiny random models are built with diffusers, saved in the diffusers layout, and loaded from disk by both sides, the
way a user loads a checkpoint. Images must agree within 3/255 at every pixel.
"""
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

diffusers = pytest.importorskip("diffusers")

from worker.inference.model.tiny import write_tiny_model  # noqa: E402
from worker.inference.pipeline import InpaintPipeline  # noqa: E402
from worker.inference.schedulers import SCHEDULERS  # noqa: E402

TOLERANCE = 3  # out of 255


def _save_diffusers_model(folder, in_channels: int):
    """Our tiny folder (tokenizer, text encoder, scheduler) with the UNet and VAE replaced by diffusers-built ones."""
    write_tiny_model(folder, in_channels=in_channels, seed=0)
    torch.manual_seed(1)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=in_channels, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {ch: _save_diffusers_model(tmp_path_factory.mktemp(f"parity{ch}"), ch) for ch in (9, 4)}


@pytest.fixture(scope="module")
def pipelines(models):
    ours = {ch: InpaintPipeline.from_pretrained(str(path), device="cpu", dtype=torch.float32)
            for ch, path in models.items()}
    theirs = {ch: diffusers.StableDiffusionInpaintPipeline.from_pretrained(
        str(path), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        for ch, path in models.items()}
    for pipe in theirs.values():
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


def _scene(width: int, height: int) -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle((width // 4, height // 3, 3 * width // 4, 5 * height // 6), fill=255)
    return image, mask


def _diffusers_images(pipe, scheduler: str | None, prompt, image, mask, seed: int, per_prompt: int, **kwargs):
    # None means the model's own scheduler: the checkpoint's PNDM (earlier tests swapped diffusers' one).
    pipe.scheduler = _diffusers_scheduler(scheduler or "pndm", pipe.scheduler.config)
    prompts = [prompt] if isinstance(prompt, str) else prompt
    generators = [torch.Generator("cpu").manual_seed(seed + i) for _ in prompts for i in range(per_prompt)]
    return pipe(prompt=prompt, image=image, mask_image=mask, generator=generators,
                num_images_per_prompt=per_prompt, **kwargs).images


def _diffusers_scheduler(name: str, config):
    classes = {"pndm": "PNDMScheduler", "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler",
               "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
               "dpmpp_2m": "DPMSolverMultistepScheduler", "dpmpp_2m_karras": "DPMSolverMultistepScheduler"}
    extra = {"use_karras_sigmas": True} if name == "dpmpp_2m_karras" else {}
    return getattr(diffusers, classes[name]).from_config(config, **extra)


def _assert_close(ours: list[Image.Image], theirs: list[Image.Image]) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.size == b.size
        diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
        assert diff.max() <= TOLERANCE, f"max pixel difference {diff.max()} > {TOLERANCE}"
    # The comparison must be able to fail: the outputs are not flat images.
    assert np.asarray(ours[0]).std() > 1.0


def _compare(pipelines, channels: int, scheduler: str | None, size=(48, 40), prompt="a red house",
             per_prompt: int = 1, seed: int = 7, steps: int = 4, **kwargs):
    ours, theirs = pipelines
    image, mask = _scene(*size)
    expected = _diffusers_images(theirs[channels], scheduler, prompt, image, mask, seed, per_prompt,
                                 num_inference_steps=steps, height=size[1], width=size[0], **kwargs)
    got = ours[channels](prompt, image, mask, scheduler=scheduler, seed=seed, num_images_per_prompt=per_prompt,
                         num_inference_steps=steps, height=size[1], width=size[0], **kwargs)
    _assert_close(got, expected)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_matches_diffusers(pipelines, scheduler):
    _compare(pipelines, 9, scheduler)


@pytest.mark.parametrize("scheduler", ["pndm", "euler_a", "dpmpp_2m"])
def test_four_channel_unet_blends_latents_like_diffusers(pipelines, scheduler):
    _compare(pipelines, 4, scheduler)


@pytest.mark.parametrize("channels,scheduler", [(9, "ddim"), (9, "euler_a"), (4, "ddpm"), (9, "dpmpp_2m_karras")])
def test_strength_below_one_matches_diffusers(pipelines, channels, scheduler):
    _compare(pipelines, channels, scheduler, strength=0.6, steps=5)


def test_batches_of_prompts_and_images_per_prompt(pipelines):
    _compare(pipelines, 9, "euler_a", prompt=["a red house", "a blue lake"], per_prompt=2,
             negative_prompt=["blurry", "dark"])


def test_negative_prompt_and_non_square_size(pipelines):
    _compare(pipelines, 9, None, size=(64, 32), negative_prompt="blurry, low quality")


@pytest.mark.parametrize("guidance", [1.0, 0.0, 12.0])
def test_guidance_on_and_off(pipelines, guidance):
    _compare(pipelines, 9, "ddim", guidance_scale=guidance)


def test_padding_mask_crop_matches_diffusers(pipelines):
    _compare(pipelines, 9, "euler", size=(64, 48), padding_mask_crop=4)


def test_model_default_scheduler_is_the_config_class(pipelines):
    ours, _ = pipelines
    assert ours[9].default_scheduler == "pndm"


def test_odd_latent_sizes_match_diffusers(pipelines):
    # 42x38 pixels -> 21x19 latents: the UNet upsamples to its skips' odd sizes, as diffusers does.
    _compare(pipelines, 9, "ddim", size=(42, 38))


def test_tiny_model_with_sd_vae_scale_matches_diffusers(tmp_path):
    """The tiny model as the CPU Compose profile writes it (VAE downsampling 8, as SD's), loaded by both sides."""
    folder = write_tiny_model(tmp_path / "tiny8", vae_scale=8)
    ours = InpaintPipeline.from_pretrained(str(folder), device="cpu", dtype=torch.float32)
    theirs = diffusers.StableDiffusionInpaintPipeline.from_pretrained(
        str(folder), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    assert ours.vae_scale_factor == theirs.vae_scale_factor == 8
    _compare(({9: ours}, {9: theirs}), 9, "ddim", size=(64, 48), steps=3)
