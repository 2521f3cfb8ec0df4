"""InpaintPipeline behaviour beyond diffusers parity: seeds, sizes, paste-back, callbacks and argument errors."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from worker.inference.pipeline import PHASES, InpaintCancelled, InpaintPipeline


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return InpaintPipeline.from_pretrained(str(tiny_model_dir), device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).rectangle((12, 10, 36, 30), fill=255)
    return image, mask


def _run(pipe, scene, **kwargs):
    image, mask = scene
    kwargs.setdefault("num_inference_steps", 3)
    kwargs.setdefault("seed", 11)
    return pipe("a cat", image, mask, **kwargs)


def _array(image):
    return np.asarray(image, dtype=np.int16)


def test_same_seed_same_image_and_image_i_uses_seed_plus_i(pipe, scene):
    pair = _run(pipe, scene, num_images_per_prompt=2, seed=5)
    assert len(pair) == 2
    assert np.array_equal(_array(pair[0]), _array(_run(pipe, scene, seed=5)[0]))
    # As in diffusers, the input image's latent sample uses the batch's first generator: alone, seed 6 draws it
    # from its own generator, so the pixels agree to within rounding rather than exactly.
    assert np.abs(_array(pair[1]) - _array(_run(pipe, scene, seed=6)[0])).max() <= 3
    assert np.abs(_array(pair[0]) - _array(pair[1])).max() > 20


def test_explicit_seed_list_and_batch_count(pipe, scene):
    images = pipe(["a", "b"], *scene, num_images_per_prompt=2, seed=[1, 2, 3, 4], num_inference_steps=2)
    assert len(images) == 4
    with pytest.raises(ValueError, match="seed"):
        pipe(["a", "b"], *scene, num_images_per_prompt=2, seed=[1, 2], num_inference_steps=2)


def test_random_seed_when_none(pipe, scene):
    first, second = _run(pipe, scene, seed=None)[0], _run(pipe, scene, seed=None)[0]
    assert not np.array_equal(_array(first), _array(second))


def test_default_size_is_the_image_rounded_down(pipe):
    image = Image.new("RGB", (50, 37), (200, 30, 30))
    mask = Image.new("L", (50, 37), 255)
    out = pipe("x", image, mask, num_inference_steps=2, seed=0)[0]
    step = pipe.size_multiple
    assert out.size == (50 - 50 % step, 37 - 37 % step)


def test_keep_unmasked_keeps_every_unmasked_pixel_exactly(pipe, scene):
    image, mask = scene
    out = _run(pipe, scene, keep_unmasked=True, mask_blur=0)[0]
    keep = np.asarray(mask) == 0
    assert out.size == image.size
    assert np.array_equal(_array(out)[keep], _array(image)[keep])
    assert not np.array_equal(_array(out)[~keep], _array(image)[~keep])


def test_mask_blur_softens_the_pasted_edge_and_far_pixels_stay(pipe, scene):
    image, mask = scene
    sharp = _array(_run(pipe, scene, keep_unmasked=True, mask_blur=0)[0])
    soft = _array(_run(pipe, scene, keep_unmasked=True, mask_blur=3)[0])
    assert np.array_equal(soft[0:2], _array(image)[0:2])      # far from the mask: the original
    edge = (slice(8, 12), slice(12, 37))                       # just outside the mask's top edge
    assert not np.array_equal(soft[edge], sharp[edge])


def test_padding_mask_crop_keeps_pixels_outside_the_mask(pipe, scene):
    image, mask = scene
    out = _run(pipe, scene, padding_mask_crop=2)[0]
    keep = np.asarray(mask) == 0
    assert out.size == image.size
    assert np.array_equal(_array(out)[keep], _array(image)[keep])


def test_callback_reports_every_step_and_can_cancel(pipe, scene):
    seen = []
    _run(pipe, scene, num_inference_steps=4, scheduler="ddim", callback=lambda step, total: seen.append((step, total)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    seen.clear()  # PNDM runs one UNet call more than the steps asked for; progress still counts to 4
    _run(pipe, scene, num_inference_steps=4, scheduler="pndm", callback=lambda step, total: seen.append((step, total)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4), (4, 4)]
    calls = []
    with pytest.raises(InpaintCancelled):
        _run(pipe, scene, num_inference_steps=4, callback=lambda step, total: calls.append(step) or step < 2)
    assert calls == [1, 2]


def test_on_phase_reports_encoding_denoising_decoding_around_the_steps(pipe, scene):
    seen = []
    _run(pipe, scene, num_inference_steps=2, scheduler="ddim", on_phase=seen.append,
         callback=lambda step, total: seen.append(step))
    assert seen == ["encoding", "denoising", 1, 2, "decoding"]
    assert tuple(name for name in seen if isinstance(name, str)) == PHASES


def test_the_library_phases_are_the_services_middle_phases():
    from api_client import state

    assert PHASES == (state.ENCODING, state.DENOISING, state.DECODING)


def test_sd15_treats_a_none_and_an_empty_negative_prompt_alike(pipe, scene):
    # As diffusers' StableDiffusionInpaintPipeline does; jobs submitted before null was allowed keep their images.
    unset, empty = _run(pipe, scene, negative_prompt=None), _run(pipe, scene, negative_prompt="")
    other = _run(pipe, scene, negative_prompt="blurry")
    assert np.array_equal(_array(unset[0]), _array(empty[0]))
    assert not np.array_equal(_array(unset[0]), _array(other[0]))


def test_strength_shortens_the_schedule(pipe, scene):
    seen = []
    _run(pipe, scene, num_inference_steps=10, strength=0.3, scheduler="euler",
         callback=lambda step, total: seen.append(total))
    assert set(seen) == {3}


@pytest.mark.parametrize("kwargs,name", [
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"guidance_scale": float("nan")}, "guidance_scale"),
    ({"guidance_scale": -1.0}, "guidance_scale"),
    ({"strength": 0.0}, "strength"),
    ({"strength": 1.5}, "strength"),
    ({"strength": 0.1, "num_inference_steps": 2}, "strength"),
    ({"scheduler": "lms"}, "scheduler"),
    ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
    ({"height": 31}, "height"),
    ({"width": 1}, "width"),
    ({"mask_blur": -1}, "mask_blur"),
    ({"padding_mask_crop": -4}, "padding_mask_crop"),
    ({"seed": -3}, "seed"),
    ({"negative_prompt": ["a", "b"]}, "negative_prompt"),
])
def test_bad_arguments_name_the_argument(pipe, scene, kwargs, name):
    with pytest.raises(ValueError, match=name):
        _run(pipe, scene, **kwargs)


def test_bad_images_are_refused(pipe, scene):
    image, mask = scene
    with pytest.raises(ValueError, match="mask: size"):
        pipe("x", image, mask.resize((20, 20)))
    with pytest.raises(ValueError, match="image: expected a PIL image"):
        pipe("x", b"not an image", mask)
    with pytest.raises(ValueError, match="prompt"):
        pipe(42, image, mask)
    with pytest.raises(ValueError, match="padding_mask_crop needs a mask"):
        pipe("x", image, Image.new("L", image.size, 0), padding_mask_crop=4, num_inference_steps=2)


def test_a_blurred_paste_back_around_a_crop_keeps_the_original_outside_the_box(pipe):
    # The blur reaches past the crop box: there the result must be the original, never black.
    image = Image.new("RGB", (48, 40), (200, 200, 200))
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).rectangle((20, 16, 28, 24), fill=255)
    out = _array(pipe("x", image, mask, num_inference_steps=2, seed=0, padding_mask_crop=0, mask_blur=6)[0])
    outside = np.ones(out.shape[:2], dtype=bool)
    outside[16:25, 20:30] = False  # the crop box: the mask's bounding box, padding 0
    assert np.abs(out[outside] - 200).max() <= 2  # premultiplied-alpha rounding only


def _psnr(a, b) -> float:
    mse = np.mean((_array(a).astype(np.float64) - _array(b)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def test_cpu_bfloat16_runs_channels_last_close_to_float32(pipe, scene, tiny_model_dir):
    """The CPU levers of bfloat16 (NHWC conv weights) change the layout, not the picture; float32 stays NCHW,
    the layout the parity tests compare bit for bit with diffusers."""
    half = InpaintPipeline.from_pretrained(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    channels_last = torch.channels_last
    assert half.unet.conv_in.weight.is_contiguous(memory_format=channels_last)
    assert half.vae.decoder.conv_in.weight.is_contiguous(memory_format=channels_last)
    assert not pipe.unet.conv_in.weight.is_contiguous(memory_format=channels_last)
    job = dict(scheduler="dpmpp_2m_karras", num_inference_steps=4)
    [fast] = _run(half, scene, **job)
    assert _psnr(fast, _run(pipe, scene, **job)[0]) >= 30
    for module in (half.unet, half.vae):  # the same bfloat16 weights in NCHW: the layout alone moves little
        module.to(memory_format=torch.contiguous_format)
    assert _psnr(fast, _run(half, scene, **job)[0]) >= 40
