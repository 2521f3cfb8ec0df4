"""`inpaint run`: one job in this process, without queue or storage (DESIGN §6).

The CLI (api_client/cli.py, which must not import torch) loads this module by name. The options become a job with
the schema's defaults and are painted by the worker's own `jobs.paint`, so `inpaint run` paints what
`inpaint submit` with the same options paints.
"""
import argparse
import sys
import uuid
from pathlib import Path

from PIL import Image

from api_client import schema
from api_client.cli import ProgressDisplay, job_options
from worker import jobs
from worker.inference.pipeline import InpaintPipeline


def run_local(args: argparse.Namespace) -> list[Path]:
    """Load args.model, inpaint args.image under args.mask, save the image(s) at args.out; returns their paths."""
    image, mask = _open_input("image", args.image).convert("RGB"), _open_input("mask", args.mask).convert("L")
    job = local_job(args)
    outputs = output_paths(args.out, job.num_images)
    pipe = InpaintPipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    progress = None if args.json else ProgressDisplay(sys.stderr)
    callback = None if progress is None else (lambda step, total: progress.update(step, total, "running"))
    images = jobs.paint(pipe, job, image, mask, jobs.job_seed(job), callback)
    if progress is not None:
        progress.close()
    outputs[0].parent.mkdir(parents=True, exist_ok=True)
    for generated, path in zip(images, outputs):
        generated.save(path)
    return outputs


def local_job(args: argparse.Namespace) -> schema.Job:
    """The job the options describe, on the schema's defaults. It is never queued: image and mask name local files
    and the output spec is unused (run_local saves at args.out), so the schema's s3:// checks do not apply; the
    pipeline checks every painting option itself."""
    return schema.Job(job_id=uuid.uuid4().hex, image=args.image, mask=args.mask, prompt=args.prompt,
                      output=schema.OutputSpec(bucket="", prefix=""), **job_options(args))


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
