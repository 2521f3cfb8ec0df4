"""`inpaint run`: one job without queue or storage (DESIGN §6), in a process of its own.

The CLI (api_client/cli.py) never imports the worker side: it starts `python -m worker.local_run`, writes the
request as one JSON object on its standard input ({"model", "image", "mask", "prompt", "out", "options", "device",
"dtype"}: plain values) and reads JSON lines back on its standard output: {"progress": [step, total]} after each
denoise step, then {"files": [...]} or {"error": {"kind": "usage" | "job" | "failed", "code", "message"}}.
The options become a job with the schema's defaults and are painted by the worker's own `jobs.paint`, so
`inpaint run` paints what `inpaint submit` with the same options paints.
"""
import json
import sys
import uuid
from pathlib import Path
from typing import Callable

from PIL import Image, UnidentifiedImageError

from api_client import schema

INSTALL_HINT = "the in-process runner needs the worker extra (pip install 'inpaint-fleet[worker]')"


def run_local(model: str, image: str, mask: str, prompt: str, out: Path, options: dict, device: str | None = None,
              dtype: str | None = None, progress: Callable[[int, int], None] | None = None) -> list[Path]:
    """Load `model`, inpaint the image file under the mask file, save the image(s) at `out`; returns their paths.
    `options`: job fields (DESIGN §3) by name; `progress(step, total)` is called after each denoise step."""
    image_file, mask_file = _open_input("image", image).convert("RGB"), _open_input("mask", mask).convert("L")
    job = local_job(image, mask, prompt, options)
    outputs = output_paths(out, job.num_images)
    # The torch side is imported only now, so that a client-only install still gets main()'s one-line answer.
    from worker import jobs
    from worker.inference.pipeline import InpaintPipeline

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


def main() -> int:
    """The process `inpaint run` starts: one request on stdin, JSON lines on stdout (see the module's docstring)."""
    def send(message: dict) -> None:
        print(json.dumps(message), flush=True)

    request = json.load(sys.stdin)
    try:
        files = run_local(request["model"], request["image"], request["mask"], request["prompt"],
                          Path(request["out"]), request["options"], device=request.get("device"),
                          dtype=request.get("dtype"), progress=lambda step, total: send({"progress": [step, total]}))
    except Exception as error:   # every failure goes back to the CLI as one line, never a traceback
        send({"error": error_message(error)})
        return 1
    send({"files": [str(path) for path in files]})
    return 0


def error_message(error: Exception) -> dict:
    """An exception of run_local as the CLI reports it: kind (usage: exit 2, job: by its code, failed: exit 1)."""
    if isinstance(error, ImportError):
        return {"kind": "usage", "code": schema.INVALID_INPUT, "message": f"run: {INSTALL_HINT}: {error}"}
    if isinstance(error, Image.DecompressionBombError):   # a header claiming a huge size: refused before decoding
        return {"kind": "job", "code": schema.LIMIT_EXCEEDED, "message": f"run: {error}"}
    if isinstance(error, schema.JobError):
        return {"kind": "job", "code": error.code, "message": error.message}
    if isinstance(error, (UnidentifiedImageError, ValueError)):   # PIL's error for an input that is no image
        return {"kind": "usage", "code": schema.INVALID_INPUT, "message": f"run: {error}"}
    code = getattr(error, "code", None)   # ModelLoadError carries model_unavailable
    if code in schema.ERROR_CODES:
        return {"kind": "failed", "code": code, "message": f"run: {error}"}
    return {"kind": "failed", "code": schema.INTERNAL, "message": f"run: {type(error).__name__}: {error}"}


if __name__ == "__main__":
    sys.exit(main())
