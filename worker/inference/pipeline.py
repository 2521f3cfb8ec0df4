"""InpaintPipeline: the library API of DESIGN §2.

prompt + image + mask -> text embeddings, latents and mask conditioning -> the denoise loop (worker.inference.denoise) ->
VAE decode -> PIL images, optionally pasted back over the original. Every random number is drawn on CPU generators,
one per image, in the order diffusers' StableDiffusionInpaintPipeline (SDXL: StableDiffusionXLInpaintPipeline)
draws them, so a seed gives diffusers' pixels.

SDXL models add the pooled text embedding and the micro-conditioning time ids, with diffusers' defaults: original
and target size = the processing size, crop top-left (0, 0), aesthetic scores 6.0 and 2.5 where the model asks for
them. No invisible watermark is added to SDXL images (diffusers adds one when the invisible-watermark package is
installed).
"""
import gc
import math
import secrets
from dataclasses import dataclass

import torch
from PIL import Image

from worker.inference import imaging
from worker.inference.denoise import DenoiseInputs, DenoiseRunner, InpaintCancelled
from worker.inference.model.loader import ModelComponents, load_components
from worker.inference.names import MAX_SEED, SCHEDULERS
from worker.inference.schedulers import make_sampler, scheduler_name_for_config

__all__ = ["InpaintPipeline", "InpaintCancelled", "InpaintArgumentError", "SCHEDULERS", "PHASES"]

# What `on_phase(name)` reports, in order: prompts and image to latents, the denoise loop (whose steps `callback`
# reports), latents to pixels.
PHASES = ("encoding", "denoising", "decoding")

# diffusers' StableDiffusionXLInpaintPipeline defaults, for models whose time ids end in an aesthetic score.
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5


class InpaintArgumentError(ValueError):
    """A call argument out of range or of the wrong kind; the message names the argument."""


@dataclass(frozen=True)
class _Request:
    """Validated call arguments, one entry per output image where it varies per image."""
    prompts: list[str]             # one per image
    negative_prompts: list[str] | None  # one per image; None: not given (SDXL may use zero embeddings then)
    seeds: list[int]               # one per image
    height: int
    width: int
    begin: int                     # first index into the sampler's timesteps (strength < 1 starts later)
    steps_to_run: int              # the steps the caller sees in progress: int(num_inference_steps * strength)
    sampler: object                # worker.inference.schedulers.Sampler, tables on the model's device


class InpaintPipeline:
    def __init__(self, components: ModelComponents, cuda_graphs: str = "auto", max_graphs: int = 8):
        self.unet, self.vae, self.text_encoder = components.unet, components.vae, components.text_encoder
        self.family = components.family
        # SDXL's VAE may run in float32 under a float16 UNet (force_upcast); everything else runs in self.dtype.
        self.vae_dtype = next(self.vae.parameters()).dtype
        self.scheduler_config = components.scheduler_config
        self.default_scheduler = scheduler_name_for_config(self.scheduler_config)
        self.device, self.dtype = components.device, components.dtype
        self.vae_scale_factor = self.vae.scale_factor
        if self.device.type == "cpu" and self.dtype == torch.bfloat16:
            use_channels_last(self.unet, self.vae)
        self.runner = DenoiseRunner(self.unet, mode=cuda_graphs, max_graphs=max_graphs)

    @classmethod
    def from_pretrained(cls, model: str, device=None, dtype=None, revision=None, cache_dir=None,
                        local_files_only: bool = False, cuda_graphs: str = "auto",
                        max_graphs: int = 8) -> "InpaintPipeline":
        components = load_components(model, device=device, dtype=dtype, revision=revision, cache_dir=cache_dir,
                                     local_files_only=local_files_only)
        return cls(components, cuda_graphs=cuda_graphs, max_graphs=max_graphs)

    def release_memory(self) -> None:
        """Drop the captured CUDA graphs (each holds its step's activations) and hand cached GPU memory back: what
        a job that ran out of memory may need. Graphs are captured again by the next jobs that use them."""
        self.runner.forget_graphs()
        gc.collect()
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                torch.cuda.empty_cache()

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of the VAE's factor (the UNet upsamples to its skips' odd sizes)."""
        return self.vae_scale_factor

    @torch.no_grad()
    def __call__(self, prompt, image: Image.Image, mask: Image.Image, negative_prompt=None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, strength: float = 1.0,
                 scheduler: str | None = None, seed=None, num_images_per_prompt: int = 1,
                 height: int | None = None, width: int | None = None, mask_blur: int = 0,
                 padding_mask_crop: int | None = None, keep_unmasked: bool = False,
                 callback=None, on_phase=None) -> list[Image.Image]:
        """See DESIGN §2. `callback(step, total)` follows the denoise loop (False cancels); `on_phase(name)`, if
        given, is called as each of PHASES begins (it never waits for the device)."""
        on_phase = on_phase or _no_phase
        _check_images(image, mask)
        _check_number("guidance_scale", guidance_scale, low=0.0)
        _check_int("mask_blur", mask_blur, low=0)
        request = self._request(prompt, image, negative_prompt, num_inference_steps, strength, scheduler, seed,
                                num_images_per_prompt, height, width)
        crop = None
        if padding_mask_crop is not None:
            _check_int("padding_mask_crop", padding_mask_crop, low=0)
            try:
                crop = imaging.mask_crop_region(mask, request.width, request.height, padding_mask_crop)
            except ValueError as error:
                raise InpaintArgumentError(str(error)) from None
        rgb = image.convert("RGB")
        on_phase("encoding")
        latents = self._denoise(request, rgb, mask, crop, float(guidance_scale), callback, on_phase)
        on_phase("decoding")
        decoded = self.vae.decode(latents.to(self.vae_dtype) / self.vae.config.scaling_factor)
        images = imaging.tensor_to_images(decoded.float())
        if crop is not None or keep_unmasked:
            paste_mask = imaging.blur_mask(mask, mask_blur)
            images = [imaging.paste_back(rgb, generated, paste_mask, crop) for generated in images]
        return images

    def _request(self, prompt, image, negative_prompt, steps, strength, scheduler, seed, per_prompt,
                 height, width) -> _Request:
        prompts = _as_prompt_list("prompt", prompt)
        negatives = _negative_prompts(negative_prompt, len(prompts))
        _check_int("num_inference_steps", steps, low=1)
        _check_int("num_images_per_prompt", per_prompt, low=1)
        _check_number("strength", strength, low=0.0, high=1.0, low_open=True)
        scheduler = scheduler or self.default_scheduler
        if scheduler not in SCHEDULERS:
            raise InpaintArgumentError(f"scheduler: {scheduler!r} is not one of {', '.join(SCHEDULERS)}")
        height, width = self._size(image, height, width)
        # diffusers' get_timesteps: strength keeps the last int(steps * strength) steps.
        kept = min(int(steps * strength), steps)
        if kept < 1:
            raise InpaintArgumentError(f"strength: {strength} keeps {kept} of {steps} steps; raise strength or "
                             "num_inference_steps so that at least one step runs")
        sampler = make_sampler(scheduler, self.scheduler_config, steps, self.device)
        return _Request(prompts=[p for p in prompts for _ in range(per_prompt)],
                        negative_prompts=None if negatives is None else [n for n in negatives
                                                                         for _ in range(per_prompt)],
                        seeds=_seeds(seed, len(prompts), per_prompt), height=height, width=width,
                        begin=(steps - kept) * sampler.order, steps_to_run=kept, sampler=sampler)

    def _size(self, image: Image.Image, height, width) -> tuple[int, int]:
        for name, value in (("height", height), ("width", width)):
            if value is not None:
                _check_int(name, value, low=self.size_multiple)
                if value % self.size_multiple:
                    raise InpaintArgumentError(f"{name}: {value} is not a multiple of {self.size_multiple}")
        height, width = imaging.default_size(image, height, width, self.size_multiple)
        if height < self.size_multiple or width < self.size_multiple:
            raise InpaintArgumentError(f"image: {image.width}x{image.height} is smaller than the model's minimum "
                             f"{self.size_multiple}x{self.size_multiple}")
        return height, width

    def _denoise(self, req: _Request, image: Image.Image, mask: Image.Image, crop, guidance: float,
                 callback, on_phase) -> torch.Tensor:
        sampler = req.sampler
        generators = [torch.Generator("cpu").manual_seed(s) for s in req.seeds]
        batch, guided = len(req.seeds), guidance > 1.0
        pixels = imaging.image_to_tensor(image, req.height, req.width, crop)
        mask_pixels = imaging.mask_to_tensor(mask, req.height, req.width, crop)
        latent_shape = (batch, self.vae.config.latent_channels,
                        req.height // self.vae_scale_factor, req.width // self.vae_scale_factor)
        four_channel = self.unet.config.in_channels == 4
        starts_from_image = req.begin > 0

        # The draws below follow diffusers' order: image latents (generator 0), the initial noise (every
        # generator), the masked-image latents (generator 0), then the per-step noise of ancestral samplers.
        image_latents = None
        if four_channel or starts_from_image:
            image_latents = self._encode(pixels, generators[0]).expand(latent_shape)
        noise = torch.cat([self._randn(latent_shape[1:], g) for g in generators])
        if starts_from_image:
            latents = sampler.add_noise(image_latents, noise, req.begin)
        else:
            latents = noise * sampler.init_noise_sigma
        mask_latents = torch.nn.functional.interpolate(mask_pixels, size=latent_shape[2:]).to(self.device,
                                                                                                 self.dtype)
        masked = pixels * (mask_pixels < 0.5)
        if four_channel:  # the masked image's encoding draw, which diffusers makes for 4-channel UNets too
            self._randn((self.vae.config.latent_channels, *latent_shape[2:]), generators[0], self.vae_dtype)
            condition = None
        else:
            masked_latents = self._encode(masked, generators[0])
            condition = torch.cat([mask_latents, masked_latents], dim=1).expand(batch, -1, -1, -1)
        step_noise = self._step_noise(sampler, req.begin, latent_shape, generators)
        text, pooled = self._text(req, guided)
        if guided and condition is not None:
            condition = torch.cat([condition, condition])
        inputs = DenoiseInputs(
            latents=latents, text=text, condition=condition, guidance_scale=guidance, step_noise=step_noise,
            blend=(image_latents, noise, mask_latents.expand(batch, -1, -1, -1)) if four_channel else None,
            text_embeds=pooled, time_ids=None if pooled is None else self._time_ids(req, guided))
        on_phase("denoising")
        return self.runner.run(sampler, inputs, req.begin, _as_user_steps(callback, req.steps_to_run))

    def _encode(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Sample the VAE's latent distribution with `generator`, scaled as the UNet expects, in self.dtype.

        The pixels pass through self.dtype first, as in diffusers, also when the VAE runs upcast to float32."""
        mean, std = self.vae.encode(pixels.to(self.device, self.dtype).to(self.vae_dtype))
        sample = mean + std * self._randn(mean.shape[1:], generator, self.vae_dtype)
        return sample.to(self.dtype) * self.vae.config.scaling_factor

    def _randn(self, shape, generator: torch.Generator, dtype: torch.dtype | None = None) -> torch.Tensor:
        # Drawn on the CPU in the model's (or the VAE's) dtype, as diffusers' randn_tensor does for a CPU generator.
        return torch.randn((1, *shape), generator=generator, dtype=dtype or self.dtype).to(self.device)

    def _step_noise(self, sampler, begin: int, latent_shape, generators) -> torch.Tensor | None:
        """Per-step ancestral noise, drawn up front: (T, B, C, h, w), zeros where a step draws none."""
        draws = [i for i in range(begin, sampler.num_steps) if sampler.draws_noise(i)]
        if not draws:
            return None
        noise = torch.zeros((sampler.num_steps, *latent_shape), dtype=self.dtype)
        for i in draws:
            noise[i] = torch.cat([torch.randn((1, *latent_shape[1:]), generator=g, dtype=self.dtype)
                                  for g in generators])
        return noise.to(self.device)

    def _text(self, req: _Request, guided: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(text embeddings (G*B, 77, D), SDXL's pooled embeddings (G*B, P) or None), [negatives; prompts] when
        guided. A negative prompt of None is "" except for SDXL models with force_zeros_for_empty_prompt, where
        diffusers zeroes the negative embeddings instead."""
        zeroed = guided and req.negative_prompts is None and self.family.force_zeros_for_empty_prompt
        negatives = [""] * len(req.prompts) if req.negative_prompts is None else req.negative_prompts
        texts = req.prompts + (negatives if guided and not zeroed else [])
        hidden, pooled = self._encode_texts(texts)
        batch = len(req.prompts)
        if zeroed:
            return _zeros_then(hidden), None if pooled is None else _zeros_then(pooled)
        if guided:
            return _negatives_first(hidden, batch), None if pooled is None else _negatives_first(pooled, batch)
        return hidden, pooled

    def _encode_texts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden states and pooled embeddings (or None) of `texts`, encoding each distinct text once."""
        distinct = list(dict.fromkeys(texts))
        hidden, pooled = self.text_encoder.encode_with_pooled(distinct)
        rows = [distinct.index(t) for t in texts]
        return hidden.to(self.device, self.dtype)[rows], None if pooled is None else \
            pooled.to(self.device, self.dtype)[rows]

    def _time_ids(self, req: _Request, guided: bool) -> torch.Tensor:
        """SDXL's micro-conditioning, one row per UNet batch entry: (G*B, 6), or (G*B, 5) ending in an aesthetic
        score. diffusers' defaults: original size = target size = (height, width), crop top-left (0, 0)."""
        size, crop = (req.height, req.width), (0, 0)
        if self.family.requires_aesthetics_score:
            ids, negative = (*size, *crop, AESTHETIC_SCORE), (*size, *crop, NEGATIVE_AESTHETIC_SCORE)
        else:
            ids = negative = (*size, *crop, *size)
        batch = len(req.prompts)
        rows = ([negative] * batch if guided else []) + [ids] * batch
        return torch.tensor(rows, dtype=self.dtype, device=self.device)

    def warmup(self, height: int, width: int, num_inference_steps: int, scheduler: str | None = None,
               batch: int = 1, guidance_scale: float = 7.5) -> None:
        """Run one throw-away job of this shape so the CUDA graph (and kernel autotuning) is ready."""
        blank = Image.new("RGB", (width, height), (127, 127, 127))
        self(["warm-up"] * batch, blank, Image.new("L", (width, height), 255), scheduler=scheduler,
             num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=0)


def _no_phase(name: str) -> None:
    pass


def use_channels_last(*modules: torch.nn.Module) -> None:
    """Store conv weights NHWC, so that every activation follows (a conv's output takes its weight's layout).

    oneDNN's bfloat16 convolutions work in NHWC; on NCHW tensors each conv reorders its input and output. Measured
    on the SD1.5 architecture at 512x512 (benchmarks/results/2026-12-01-cpu-pipeline.md): a UNet step 0.8x, the VAE
    decode 0.5x the NCHW time. Float32 keeps NCHW, where the parity tests compare with diffusers bit for bit."""
    for module in modules:
        module.to(memory_format=torch.channels_last)


def _zeros_then(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros_like(t), t])


def _negatives_first(t: torch.Tensor, batch: int) -> torch.Tensor:
    """Rows [prompts; negatives] -> [negatives; prompts], the guidance batch order."""
    return torch.cat([t[batch:], t[:batch]])


def _negative_prompts(negative_prompt, prompts: int) -> list[str] | None:
    """One negative prompt per prompt, or None when none was given (None and "" differ for SDXL models)."""
    if negative_prompt is None:
        return None
    negatives = _as_prompt_list("negative_prompt", negative_prompt)
    if len(negatives) == 1 < prompts:
        negatives = negatives * prompts
    if len(negatives) != prompts:
        raise InpaintArgumentError(f"negative_prompt: expected 1 or {prompts} entries (one per prompt), "
                                   f"got {len(negatives)}")
    return negatives


def _as_user_steps(callback, steps: int):
    """Progress in the caller's steps: PNDM makes one UNet call more than asked for; diffusers counts the same way."""
    if callback is None:
        return None
    return lambda done, total: callback(min(done, steps), steps)


def _as_prompt_list(name: str, value) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)) or not values or not all(isinstance(v, str) for v in values):
        raise InpaintArgumentError(f"{name}: expected a string or a non-empty list of strings, got {type(value).__name__}")
    return list(values)


def _seeds(seed, prompts: int, per_prompt: int) -> list[int]:
    """One seed per image: `seed + i` for image i of each prompt, or an explicit list of one per image."""
    if seed is None:
        seed = secrets.randbelow(MAX_SEED - per_prompt)
    if isinstance(seed, (list, tuple)):
        if len(seed) != prompts * per_prompt:
            raise InpaintArgumentError(f"seed: a list needs one seed per image ({prompts * per_prompt}), got {len(seed)}")
        for s in seed:
            _check_int("seed", s, low=0, high=MAX_SEED)
        return list(seed)
    _check_int("seed", seed, low=0, high=MAX_SEED - per_prompt)
    return [seed + i for _ in range(prompts) for i in range(per_prompt)]


def _check_images(image, mask) -> None:
    for name, value in (("image", image), ("mask", mask)):
        if not isinstance(value, Image.Image):
            raise InpaintArgumentError(f"{name}: expected a PIL image, got {type(value).__name__}")
        if value.width < 1 or value.height < 1:
            raise InpaintArgumentError(f"{name}: the image is empty ({value.width}x{value.height})")
    if image.size != mask.size:
        raise InpaintArgumentError(f"mask: size {mask.width}x{mask.height} differs from the image's "
                         f"{image.width}x{image.height}")


def _check_int(name: str, value, low: int | None = None, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InpaintArgumentError(f"{name}: expected an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise InpaintArgumentError(f"{name}: {value} is outside [{low}, {high if high is not None else 'inf'}]")


def _check_number(name: str, value, low: float, high: float | None = None, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InpaintArgumentError(f"{name}: expected a finite number, got {value!r}")
    too_low = value <= low if low_open else value < low
    if too_low or (high is not None and value > high):
        bounds = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}]"
        raise InpaintArgumentError(f"{name}: {value} is outside {bounds}")
