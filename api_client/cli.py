"""The `inpaint` command (DESIGN §6): submit, status, watch, cancel, fetch through the queue; run in-process.

Every command takes `--json` for scripts. Exit codes: 0 ok, 1 the job failed or was canceled (or the service could
not be reached), 2 a usage or input error.
"""
import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError
from PIL import UnidentifiedImageError
from redis.exceptions import RedisError

from api_client import schema
from api_client.client import EnqueueError, InpaintClient

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE = 0, 1, 2
# The CLI's own error code for a Redis it cannot reach (the job codes of DESIGN §5 describe jobs, not clients).
QUEUE_UNAVAILABLE = "queue_unavailable"
# Likewise for a job id the state store does not know: never submitted, or its hash expired.
JOB_NOT_FOUND = "job_not_found"
BAR_WIDTH = 30

# Job options shared by `submit` and `run`: (flag, job field, type, help). Unset options are left out, so the
# job schema's defaults apply.
JOB_OPTIONS = (
    ("--negative-prompt", "negative_prompt", str, "what the image should not show"),
    ("--steps", "num_inference_steps", int, "denoising steps"),
    ("--guidance", "guidance_scale", float, "classifier-free guidance scale"),
    ("--strength", "strength", float, "how far to move from the image, in (0, 1]"),
    ("--scheduler", "scheduler", str, "sampler: " + ", ".join(schema.SCHEDULERS)),
    ("--seed", "seed", int, "image i uses seed + i"),
    ("--num-images", "num_images", int, "images per job"),
    ("--width", "width", int, "output width (default: the image's)"),
    ("--height", "height", int, "output height (default: the image's)"),
    ("--mask-blur", "mask_blur", int, "blur radius of the pasted-back edge, in pixels"),
    ("--padding-mask-crop", "padding_mask_crop", int, "inpaint only the mask's box plus this margin"),
)


class UsageError(Exception):
    """Bad command-line input found after parsing (exit code 2)."""


class CommandFailed(Exception):
    """The command could not do its work (exit code 1), with a job error code and a one-line message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except schema.JobError as error:
        _fail(args, error.code, error.message)
        return EXIT_USAGE
    except CommandFailed as error:
        _fail(args, error.code, error.message)
        return EXIT_JOB_FAILED
    except (UsageError, ValueError) as error:
        _fail(args, schema.INVALID_INPUT, str(error))
        return EXIT_USAGE
    except TimeoutError as error:
        _fail(args, schema.TIMEOUT, str(error))
        return EXIT_JOB_FAILED
    except (RedisError, EnqueueError) as error:
        _fail(args, QUEUE_UNAVAILABLE, str(error))
        return EXIT_JOB_FAILED
    except (BotoCoreError, ClientError) as error:
        _fail(args, schema.STORAGE_UNAVAILABLE, str(error))
        return EXIT_JOB_FAILED
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON for scripts instead of text")
    parser = argparse.ArgumentParser(prog="inpaint", description="Submit inpainting jobs to the queue and follow "
                                     "them, or run one in this process. Exit codes: 0 ok, 1 the job failed or was "
                                     "canceled, 2 a usage or input error.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    submit = commands.add_parser("submit", parents=[common], help="submit a job to the queue")
    _add_inputs(submit)
    _add_job_options(submit)
    submit.add_argument("--format", dest="output_format", choices=schema.OUTPUT_FORMATS, help="output format")
    submit.add_argument("--priority", type=int, help="0-9, lower is served first (default 5)")
    submit.add_argument("--job-id", help="the job's id (default: a new one); resubmitting an id does not re-run")
    submit.add_argument("--wait", action="store_true", help="wait for the job to finish")
    submit.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds")
    submit.add_argument("--out", type=Path, help="with --wait: save the images in this folder")
    submit.set_defaults(handler=_submit)

    for name, handler, text in (("status", _status, "print a job's state"),
                                ("watch", _watch, "follow a job's progress until it ends"),
                                ("cancel", _cancel, "cancel a job")):
        command = commands.add_parser(name, parents=[common], help=text)
        command.add_argument("job_id", metavar="ID")
        command.set_defaults(handler=handler)

    fetch = commands.add_parser("fetch", parents=[common], help="download a finished job's images")
    fetch.add_argument("job_id", metavar="ID")
    fetch.add_argument("--out", type=Path, required=True, help="folder for the images")
    fetch.set_defaults(handler=_fetch)

    run = commands.add_parser("run", parents=[common], help="run one job in this process, without a queue")
    run.add_argument("--model", required=True, help="hub id or local folder in the diffusers layout")
    _add_inputs(run)
    _add_job_options(run)
    run.add_argument("--out", type=Path, required=True, help="output file; image i > 0 of several gets -i")
    run.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    run.add_argument("--dtype", help="float16, bfloat16 or float32 (default: float16 on cuda)")
    run.set_defaults(handler=_run)
    return parser


def _add_inputs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", required=True, help="image file or s3:// URI")
    parser.add_argument("--mask", required=True, help="mask file or s3:// URI (white = repaint)")
    parser.add_argument("--prompt", required=True, help="what to paint in the masked area")


def _add_job_options(parser: argparse.ArgumentParser) -> None:
    for flag, field, kind, text in JOB_OPTIONS:
        parser.add_argument(flag, dest=field, type=kind, help=text, metavar=flag.lstrip("-").upper())
    parser.add_argument("--keep-unmasked", action=argparse.BooleanOptionalAction,
                        help="paste the original pixels back outside the mask")


def job_options(args: argparse.Namespace) -> dict:
    """The job options given on the command line, by job field name."""
    fields = [field for _, field, _, _ in JOB_OPTIONS] + ["keep_unmasked", "output_format", "priority", "job_id"]
    return {field: getattr(args, field) for field in fields if getattr(args, field, None) is not None}


def _submit(args) -> int:
    if (args.out or args.timeout is not None) and not args.wait:
        raise UsageError("--out and --timeout need --wait")
    with InpaintClient.from_env() as client:
        job_id = client.submit(args.image, args.mask, args.prompt, **job_options(args))
        if not args.wait:
            _print(args, {"job_id": job_id}, job_id)
            return EXIT_OK
        _follow(args, client, job_id, args.timeout)
        status = client.status(job_id)
        files = client.download(job_id, args.out) if args.out and status.state == schema.SUCCEEDED else []
    _print(args, {**asdict(status), "files": [str(f) for f in files]}, _status_text(status, files))
    return _exit_code(status)


def _status(args) -> int:
    with InpaintClient.from_env() as client:
        status = _known_status(client, args.job_id)
    _print(args, asdict(status), _status_text(status, []))
    return _exit_code(status)


def _watch(args) -> int:
    with InpaintClient.from_env() as client:
        _known_status(client, args.job_id)
        _follow(args, client, args.job_id, None)
        status = client.status(args.job_id)
    _print(args, asdict(status), _status_text(status, []))
    return _exit_code(status)


def _known_status(client: InpaintClient, job_id: str) -> schema.JobStatus:
    """The job's status; CommandFailed when the store has no such job (unknown, or its hash expired)."""
    status = client.status(job_id)
    if status.state == schema.EXPIRED:
        raise CommandFailed(JOB_NOT_FOUND, f"{job_id}: no such job (never submitted, or expired)")
    return status


def _cancel(args) -> int:
    with InpaintClient.from_env() as client:
        client.cancel(args.job_id)
    _print(args, {"job_id": args.job_id, "cancel_requested": True}, f"{args.job_id}: cancel requested")
    return EXIT_OK


def _fetch(args) -> int:
    with InpaintClient.from_env() as client:
        status = client.status(args.job_id)
        if status.state != schema.SUCCEEDED:
            _print(args, asdict(status), _status_text(status, []))
            return _exit_code(status) if status.state in schema.FINAL_STATES else EXIT_USAGE
        files = client.download(args.job_id, args.out)
    _print(args, {"job_id": args.job_id, "files": [str(f) for f in files]}, "\n".join(map(str, files)))
    return EXIT_OK


def _run(args) -> int:
    # The one import of the worker side (and torch) in api_client: only `inpaint run` needs it, so it happens here.
    try:
        from worker import local_run
        from worker.inference.model.loader import ModelLoadError
    except ImportError as error:
        raise UsageError(f"run: the in-process runner needs the worker extra (pip install 'inpaint-fleet[worker]'): "
                         f"{error}") from None
    display = None if args.json else ProgressDisplay(sys.stderr)
    progress = None if display is None else (lambda step, total: display.update(step, total, "running"))
    try:
        files = local_run.run_local(args.model, args.image, args.mask, args.prompt, args.out, job_options(args),
                                    device=args.device, dtype=args.dtype, progress=progress)
    except UnidentifiedImageError as error:  # PIL's error for an --image or --mask that is no image
        raise UsageError(f"run: {error}") from None
    except ModelLoadError as error:
        raise CommandFailed(error.code, f"run: {error}") from None
    finally:
        if display is not None:
            display.close()
    _print(args, {"files": [str(f) for f in files]}, "\n".join(map(str, files)))
    return EXIT_OK


def _follow(args, client: InpaintClient, job_id: str, timeout: float | None) -> None:
    """Show the job's events until it ends: JSON lines with --json, a live bar on a TTY, plain lines otherwise."""
    show = ProgressDisplay(sys.stdout) if not args.json else None
    for event in client.events(job_id, timeout=timeout):
        if show is None:
            print(json.dumps(event), flush=True)
        else:
            show.update(event.get("step") or 0, event.get("total_steps") or 0, event["state"])
    if show is not None:
        show.close()


class ProgressDisplay:
    """A one-line progress bar redrawn in place on a terminal; one plain line per change elsewhere."""

    def __init__(self, stream):
        self.stream = stream
        self.live = stream.isatty()
        self.last = None

    def update(self, step: int, total: int, label: str) -> None:
        if (step, total, label) == self.last:
            return
        self.last = (step, total, label)
        filled = BAR_WIDTH * step // total if total else 0
        bar = f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}]" if total else ""
        line = f"{label:<9} {bar} {step}/{total}" if total else label
        self.stream.write(f"\r{line}\x1b[K" if self.live else f"{line}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.live and self.last is not None:
            self.stream.write("\n")
            self.stream.flush()


def _status_text(status, files) -> str:
    lines = [f"{status.job_id}: {status.state}"]
    if status.total_steps:
        lines[0] += f" (step {status.step}/{status.total_steps})"
    if status.error:
        lines.append(f"error: {status.error['code']}: {status.error['message']}")
    lines += [str(f) for f in files]
    return "\n".join(lines)


def _exit_code(status) -> int:
    return EXIT_JOB_FAILED if status.state in (schema.FAILED, schema.CANCELED) else EXIT_OK


def _print(args, data: dict, text: str) -> None:
    print(json.dumps(data) if args.json else text, flush=True)


def _fail(args, code: str, message: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps({"error": {"code": code, "message": message}}), flush=True)
    else:
        print(f"inpaint: error: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
