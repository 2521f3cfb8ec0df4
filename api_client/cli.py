"""The `inpaint` command (DESIGN §6): submit, status, watch, cancel, fetch through the queue; run in-process.

Every command takes `--json` for scripts. Exit codes: 0 ok, 1 the job failed or was canceled (or the service could
not be reached), 2 a usage or input error.
"""
import argparse
import json
import re
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError
from redis.exceptions import RedisError

from api_client import schema, state
from api_client.client import CANCELABLE_STATES, EnqueueError, InpaintClient
from api_client.http import ApiRequestError
from api_client.keys_cli import add_keys_command

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130   # 128 + SIGINT, as shells report Ctrl-C
# Job error codes that mean the command's input was wrong (exit 2); the others mean the service failed (exit 1).
USAGE_CODES = frozenset({schema.INVALID_INPUT, schema.LIMIT_EXCEEDED, schema.INPUT_NOT_FOUND})
# The CLI's own error code for a Redis it cannot reach (the job codes of DESIGN §5 describe jobs, not clients).
QUEUE_UNAVAILABLE = "queue_unavailable"
# Likewise for a job id the state store does not know: never submitted, or its hash expired.
JOB_NOT_FOUND = "job_not_found"
# And for a cancel of a job that has already ended (its state is left as it was).
ALREADY_FINAL = "already_final"
BAR_WIDTH = 30

# Job options shared by `submit` and `run`: (flag, job field, type, help). Unset options are left out, so the
# job schema's defaults apply; the help names them.
JOB_OPTIONS = (
    ("--steps", "num_inference_steps", int, "denoising steps (default 50; workers allow at most INPAINT_MAX_STEPS, "
                                            "150 unless set)"),
    ("--guidance", "guidance_scale", float, "classifier-free guidance scale (default 7.5)"),
    ("--strength", "strength", float, "how far to move from the image, in (0, 1] (default 1.0)"),
    ("--seed", "seed", int, "image i uses seed + i (default: one derived from the job id)"),
    ("--num-images", "num_images", int, "images per job (default 1)"),
    ("--width", "width", int, "the width the model paints at, a multiple of 8 (default: the image's). With "
                              "--keep-unmasked (the default) the painted pixels are scaled back onto the original "
                              "image, so the result keeps the image's size; --no-keep-unmasked returns this size"),
    ("--height", "height", int, "the height the model paints at, a multiple of 8 (default: the image's); as "
                                "--width, the result keeps the image's size unless --no-keep-unmasked"),
    ("--mask-blur", "mask_blur", int, "blur radius of the pasted-back edge, in pixels (default 0)"),
    ("--padding-mask-crop", "padding_mask_crop", int, "inpaint only the mask's box plus this margin, in pixels "
                                                      "(default: the whole image)"),
)
# The flag that sets each job field, so errors speak the command line's language (`--steps`, not
# `num_inference_steps`).
FIELD_FLAGS = {**{field: flag for flag, field, _, _ in JOB_OPTIONS},
               "image": "--image", "mask": "--mask", "prompt": "--prompt", "negative_prompt": "--negative-prompt",
               "scheduler": "--scheduler", "keep_unmasked": "--keep-unmasked", "output.format": "--format",
               "priority": "--priority", "job_id": "--job-id", "num_images_per_prompt": "--num-images"}
_LEADING_FIELD = re.compile(r"^([a-z_.]+)(?=[: ])")


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
        _read_prompts(args)
        return args.handler(args)
    except schema.JobError as error:
        _fail(args, error.code, flag_message(error.message))
        return EXIT_USAGE if error.code in USAGE_CODES else EXIT_JOB_FAILED
    except CommandFailed as error:
        _fail(args, error.code, error.message)
        return EXIT_JOB_FAILED
    except (UsageError, ValueError) as error:
        _fail(args, schema.INVALID_INPUT, flag_message(str(error)))
        return EXIT_USAGE
    except TimeoutError as error:
        _fail(args, schema.TIMEOUT, str(error))
        return EXIT_JOB_FAILED
    except ApiRequestError as error:   # HTTP mode (INPAINT_API_URL): the API's own error code
        _fail(args, error.code, error.message)
        return EXIT_JOB_FAILED
    except (RedisError, EnqueueError) as error:
        _fail(args, QUEUE_UNAVAILABLE, str(error))
        return EXIT_JOB_FAILED
    except (BotoCoreError, ClientError) as error:
        _fail(args, schema.STORAGE_UNAVAILABLE, str(error))
        return EXIT_JOB_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def flag_message(message: str) -> str:
    """An error message in the command line's terms: its leading job field becomes the flag that sets it
    (`num_inference_steps: ...` -> `--steps: ...`), and JSON's null, which no flag can give, is left out."""
    message = _LEADING_FIELD.sub(lambda match: FIELD_FLAGS.get(match.group(1), match.group(1)), message, count=1)
    return message.replace(" or null", "").replace("null or ", "")


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
    run.add_argument("--dtype", help="auto, float16, bfloat16 or float32 (default auto: float16 on cuda, bfloat16 "
                     "on a CPU with AMX or AVX-512 BF16, else float32)")
    run.set_defaults(handler=_run)
    add_keys_command(commands, common)
    return parser


def _add_inputs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", required=True, help="image file or s3:// URI")
    parser.add_argument("--mask", required=True, help="mask file or s3:// URI (white = repaint)")
    for flag, field, required, text in (("--prompt", "prompt", True, "what to paint in the masked area"),
                                        ("--negative-prompt", "negative_prompt", False,
                                         "what the image should not show (default: nothing)")):
        group = parser.add_mutually_exclusive_group(required=required)
        group.add_argument(flag, dest=field, metavar="TEXT", help=f"{text}; - reads it from standard input")
        group.add_argument(f"{flag}-file", dest=f"{field}_file", type=Path, metavar="PATH",
                           help=f"read the {flag[2:].replace('-', ' ')} from this UTF-8 text file (for long ones)")


def _add_job_options(parser: argparse.ArgumentParser) -> None:
    for flag, field, kind, text in JOB_OPTIONS:
        parser.add_argument(flag, dest=field, type=kind, help=text, metavar=flag.lstrip("-").upper())
    parser.add_argument("--scheduler", choices=schema.SCHEDULERS, metavar="SCHEDULER",
                        help=f"sampler: {', '.join(schema.SCHEDULERS)} (default: the model's own)")
    parser.add_argument("--keep-unmasked", action=argparse.BooleanOptionalAction,
                        help="paste the original pixels back outside the mask, at the image's size (default: on "
                             "for jobs; the Python library's keep_unmasked defaults to off)")


def job_options(args: argparse.Namespace) -> dict:
    """The job options given on the command line, by job field name."""
    fields = [field for _, field, _, _ in JOB_OPTIONS] + ["negative_prompt", "scheduler", "keep_unmasked",
                                                          "output_format", "priority", "job_id"]
    return {field: getattr(args, field) for field in fields if getattr(args, field, None) is not None}


def _read_prompts(args: argparse.Namespace) -> None:
    """Replace `--prompt -` by standard input and `--prompt-file PATH` by the file's text (and the same for the
    negative prompt): a long prompt does not fit a command line."""
    sources = [(field, flag) for field, flag in (("prompt", "--prompt"), ("negative_prompt", "--negative-prompt"))
               if hasattr(args, f"{field}_file")]
    if all(getattr(args, field) == "-" for field, _ in sources) and len(sources) == 2:
        raise UsageError("--negative-prompt -: standard input can give only one of --prompt and --negative-prompt")
    for field, flag in sources:
        path = getattr(args, f"{field}_file")
        if path is not None:
            setattr(args, field, _without_final_newline(_read_text(f"{flag}-file", path)))
        elif getattr(args, field) == "-":
            setattr(args, field, _without_final_newline(sys.stdin.read()))


def _read_text(flag: str, path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{flag}: no such file: {path}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{flag}: {path} is not UTF-8 text") from None
    except OSError as error:
        raise UsageError(f"{flag}: {path}: {error.strerror}") from None


def _without_final_newline(text: str) -> str:
    """The text without the one line ending an editor or `echo` puts at the end of a file."""
    return text.removesuffix("\n").removesuffix("\r")


def _submit(args) -> int:
    if (args.out or args.timeout is not None) and not args.wait:
        raise UsageError("--out and --timeout need --wait")
    with InpaintClient.from_env() as client:
        job_id = client.submit(args.image, args.mask, args.prompt, **job_options(args))
        if not args.wait:
            _print(args, {"job_id": job_id}, job_id)
            return EXIT_OK
        if not args.json:   # the id first: whatever happens next, the job can be found again
            print(f"{job_id}: submitted", flush=True)
        try:
            _follow(args, client, job_id, args.timeout)
        except KeyboardInterrupt:
            return _cancel_on_interrupt(args, client, job_id)
        status = client.status(job_id)
        files = client.download(job_id, args.out) if args.out and status.state == schema.SUCCEEDED else []
    _print(args, {**asdict(status), "files": [str(f) for f in files]}, _status_text(status, files))
    return _exit_code(status)


def _cancel_on_interrupt(args, client: InpaintClient, job_id: str) -> int:
    """Ctrl-C while waiting: the job was this command's, so it is canceled rather than left running unwatched."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # a second Ctrl-C must not cut the cancel short
    found = client.cancel(job_id)
    _print(args, {"job_id": job_id, "interrupted": True, "cancel_requested": found in CANCELABLE_STATES,
                  "state": _state_after_cancel(found)}, f"interrupted: {_cancel_text(job_id, found)}")
    return EXIT_INTERRUPTED


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
        found = client.cancel(args.job_id)
    if found == schema.EXPIRED:
        raise CommandFailed(JOB_NOT_FOUND, f"{args.job_id}: no such job (never submitted, or expired)")
    if found in schema.FINAL_STATES:
        raise CommandFailed(ALREADY_FINAL, f"{args.job_id}: already {found}; nothing to cancel")
    _print(args, {"job_id": args.job_id, "cancel_requested": True, "state": _state_after_cancel(found)},
           _cancel_text(args.job_id, found))
    return EXIT_OK


def _state_after_cancel(found: str) -> str:
    return schema.CANCELED if found == schema.QUEUED else found


def _cancel_text(job_id: str, found: str) -> str:
    if found == schema.QUEUED:
        return f"{job_id}: canceled (it had not started)"
    if found == schema.RUNNING:
        return f"{job_id}: cancel requested; the job stops at its next step"
    return f"{job_id}: already {found}; nothing to cancel"


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
    # The worker side (and torch) runs in a process of its own (worker/local_run.py): api_client never imports it.
    request = {"model": args.model, "image": args.image, "mask": args.mask, "prompt": args.prompt,
               "out": str(args.out), "options": job_options(args), "device": args.device, "dtype": args.dtype}
    display = None if args.json else ProgressDisplay(sys.stderr)
    try:
        outcome = _run_worker_process(request, display)
    finally:
        if display is not None:
            display.close()
    if "error" in outcome:
        error = outcome["error"]
        if error["kind"] == "job":
            raise schema.JobError(error["code"], error["message"])
        if error["kind"] == "usage":
            raise UsageError(error["message"])
        raise CommandFailed(error["code"], error["message"])
    _print(args, {"files": outcome["files"]}, "\n".join(outcome["files"]))
    return EXIT_OK


def _run_worker_process(request: dict, display: "ProgressDisplay | None") -> dict:
    """Start `python -m worker.local_run`, hand it the request, show its progress; its final message."""
    with subprocess.Popen([sys.executable, "-m", "worker.local_run"], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as process:
        process.stdin.write(json.dumps(request))
        process.stdin.close()
        for line in process.stdout:
            message = json.loads(line)
            if "progress" not in message:
                return message
            if display is not None:
                display.update(*message["progress"], "running")
    raise CommandFailed(schema.INTERNAL, f"run: the worker process ended (status {process.returncode}) without an "
                                         "answer; its messages are above")


def _follow(args, client: InpaintClient, job_id: str, timeout: float | None) -> None:
    """Show the job's events until it ends: JSON lines with --json, a live line on a TTY, plain lines otherwise."""
    display = ProgressDisplay(sys.stdout) if not args.json else None
    try:
        for event in client.events(job_id, timeout=timeout):
            if display is None:
                print(json.dumps(event), flush=True)
            else:
                display.show(event)
    finally:
        if display is not None:
            display.close()


# How the display names each phase of a running job (state.PHASES).
PHASE_LABELS = {state.FETCHING: "fetching inputs", state.ENCODING: "encoding", state.DENOISING: "denoising",
                state.DECODING: "decoding", state.UPLOADING: "uploading"}


class ProgressDisplay:
    """A one-line progress display redrawn in place on a terminal; one plain line per change elsewhere.

    `show(event)` follows a job's events: while it runs, its phase (denoising with a bar and n/N), the time since
    this attempt started and, while denoising, the time left at the rate of the steps so far. Times come from the
    events' own timestamps. `update(step, total, label)` draws a plain bar (`inpaint run`)."""

    def __init__(self, stream):
        self.stream = stream
        self.live = stream.isatty()
        self.last = None
        self._started = None         # ts of the running attempt's first event
        self._denoise_from = None    # (step, ts) where denoising began, for the rate

    def update(self, step: int, total: int, label: str) -> None:
        self._write(f"{label:<9} {_bar(step, total)} {step}/{total}" if total else label)

    def show(self, event: dict) -> None:
        if event["state"] != schema.RUNNING:
            self.update(event["step"], event["total_steps"], event["state"])
            return
        phase, step, total, ts = event.get("phase", ""), event["step"], event["total_steps"], event["ts"]
        if self._started is None or (event["type"] == state.EVENT_STATE and phase == state.FETCHING):
            self._started, self._denoise_from = ts, None   # a new attempt starts over
        parts = [f"{schema.RUNNING:<9}", PHASE_LABELS.get(phase, phase or "starting")]
        if event["type"] == state.EVENT_RETRY:
            parts[1] = "retrying"
        if phase == state.DENOISING:
            self._denoise_from = self._denoise_from or (step, ts)
            if total:
                parts[1] += f" {_bar(step, total)} {step}/{total}"
        parts.append(f"elapsed {ts - self._started:.1f}s")
        eta = self._eta(phase, step, total, ts)
        if eta is not None:
            parts.append(f"ETA {eta:.1f}s")
        self._write("  ".join(parts))

    def _eta(self, phase: str, step: int, total: int, ts: float) -> float | None:
        """Seconds left of the denoise loop at the rate of its steps so far (decoding and upload are short)."""
        if phase != state.DENOISING or self._denoise_from is None or not total:
            return None
        first_step, first_ts = self._denoise_from
        if step <= first_step:
            return None
        return (total - step) * (ts - first_ts) / (step - first_step)

    def _write(self, line: str) -> None:
        if line == self.last:
            return
        self.last = line
        self.stream.write(f"\r{line}\x1b[K" if self.live else f"{line}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.live and self.last is not None:
            self.stream.write("\n")
            self.stream.flush()


def _bar(step: int, total: int) -> str:
    filled = BAR_WIDTH * step // total if total else 0
    return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}]"


def _status_text(status, files) -> str:
    lines = [f"{status.job_id}: {status.state}"]
    if status.total_steps:
        lines[0] += f" (step {status.step}/{status.total_steps})"
    if status.error:
        lines.append(f"error: {status.error['code']}: {flag_message(status.error['message'])}")
    for index, image in enumerate((status.result or {}).get("images", [])):
        lines.append(f"image {index}: {image['uri']}")
        if image.get("url"):
            lines.append(f"  url: {image['url']}")
    lines += [f"saved {f}" for f in files]
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
