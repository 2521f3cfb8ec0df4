"""`inpaint run`: one job in this process, without queue or storage (DESIGN §6).

The CLI (api_client/cli.py, which must not import torch) imports this module only for `inpaint run` and hands it
plain values. The options become a job with the schema's defaults and are painted by the worker's own
`jobs.paint`, so `inpaint run` paints what `inpaint submit` with the same options paints.
"""
import uuid
from pathlib import Path
from typing import Callable

from PIL import Image

from api_client import schema
from worker import jobs
from worker.inference.pipeline import InpaintPipeline


def run_local(model: str, image: str, mask: str, prompt: str, out: Path, options: dict, device: str | None = None,
              dtype: str | None = None, progress: Callable[[int, int], None] | None = None) -> list[Path]:
    """Load `model`, inpaint the image file under the mask file, save the image(s) at `out`; returns their paths.
    `options`: job fields (DESIGN §3) by name; `progress(step, total)` is called after each denoise step."""
    image_file, mask_file = _open_input("image", image).convert("RGB"), _open_input("mask", mask).convert("L")
    job = local_job(image, mask, prompt, options)
    outputs = output_paths(out, job.num_images)
    pipe = InpaintPipeline.from_pretrained(model, device=device, dtype=dtype)
    images = jobs.paint(pipe, job, image_file, mask_file, jobs.job_seed(job), progress)
    outputs[0].parent.mkdir(parents=True, exist_ok=True)
    for generated, path in zip(images, outputs):
        generated.save(path)
    return outputs


def local_job(image: str, mask: str, prompt: str, options: dict) -> schema.Job:
    """The job the options describe, on the schema's defaults. It is never queued: image and mask name local files
    and the output spec is unused (run_local saves at `out`), so the schema's s3:// checks do not apply; the
    pipeline checks every painting option itself."""
    return schema.Job(job_id=uuid.uuid4().hex, image=image, mask=mask, prompt=prompt,
                      output=schema.OutputSpec(bucket="", prefix=""), **options)


def output_paths(out: Path, count: int) -> list[Path]:
    """`out` for the first image, `<stem>-<i><suffix>` beside it for image i of several."""
    if out.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"out: {out} needs an image file extension such as .png or .jpg")
    return [out] + [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(1, count)]


def _open_input(name: str, path: str) -> Image.Image:
    if path.startswith("s3://"):
        raise ValueError(f"{name}: run reads local files; {path} is an S3 URI (use `inpaint submit` for those)")
    if not Path(path).is_file():
        raise ValueError(f"{name}: no such file: {path}")
    image = Image.open(path)
    image.load()
    return image
