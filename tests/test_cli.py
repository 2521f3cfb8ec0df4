"""The `inpaint` command: argument parsing, --json output and exit codes (0 ok, 1 job failed/canceled, 2 usage or
input error), against the same private redis-server and moto S3 as tests/test_client.py."""
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image

from api_client import cli, schema, state
from tests.reliability.test_hostile_input import png_with_header_only
from tests.test_client import (BUCKET, QUEUE, finish, picture, png_bytes, queued_messages, s3, services, store,
                               task_args)
from tests import devstack

__all__ = ["services", "store", "s3"]  # fixtures shared with tests/test_client.py
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def inputs(tmp_path):
    image, mask = tmp_path / "image.png", tmp_path / "mask.png"
    picture().save(image)
    picture((255, 255, 255)).save(mask)
    return image, mask


@pytest.fixture
def env(services, store, monkeypatch):
    """The variables `inpaint` reads, pointing at the test servers."""
    monkeypatch.setenv("INPAINT_BROKER_URL", services[0].url)
    monkeypatch.setenv("INPAINT_S3_ENDPOINT_URL", services[1].endpoint_url)
    monkeypatch.setenv("INPAINT_BUCKET", BUCKET)
    monkeypatch.setenv("INPAINT_QUEUE", QUEUE)
    return store


def inpaint(*argv, stdin: str | None = None) -> subprocess.CompletedProcess:
    """`inpaint ARGV` as its own process, with this process's environment (the `env` fixture's variables)."""
    return subprocess.run([sys.executable, "-m", "api_client.cli", *argv], input=stdin, capture_output=True,
                          text=True, timeout=120)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def submit_args(inputs, *extra) -> list[str]:
    return ["submit", "--image", str(inputs[0]), "--mask", str(inputs[1]), "--prompt", "a door", *extra]


def test_job_options_map_flags_to_job_fields(inputs):
    args = cli.build_parser().parse_args(submit_args(
        inputs, "--negative-prompt", "blur", "--steps", "12", "--guidance", "5.5", "--strength", "0.75",
        "--scheduler", "euler_a", "--seed", "9", "--num-images", "2", "--width", "64", "--height", "128",
        "--mask-blur", "4", "--padding-mask-crop", "16", "--no-keep-unmasked", "--format", "webp",
        "--priority", "1", "--job-id", "f" * 32))
    assert cli.job_options(args) == {
        "negative_prompt": "blur", "num_inference_steps": 12, "guidance_scale": 5.5, "strength": 0.75,
        "scheduler": "euler_a", "seed": 9, "num_images": 2, "width": 64, "height": 128, "mask_blur": 4,
        "padding_mask_crop": 16, "keep_unmasked": False, "output_format": "webp", "priority": 1, "job_id": "f" * 32}
    assert cli.job_options(cli.build_parser().parse_args(submit_args(inputs))) == {}
    assert cli.job_options(cli.build_parser().parse_args(submit_args(inputs, "--keep-unmasked"))) == {
        "keep_unmasked": True}


@pytest.mark.parametrize("argv", [
    ["submit", "--image", "a.png", "--mask", "m.png"],             # no --prompt
    ["submit", "--image", "a", "--mask", "m", "--prompt", "p", "--steps", "many"],
    ["submit", "--image", "a", "--mask", "m", "--prompt", "p", "--format", "gif"],
    ["fetch", "0" * 32],                                           # no --out
    ["frobnicate"],
    [],
])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == cli.EXIT_USAGE == 2
    assert "usage: inpaint" in capsys.readouterr().err


def test_submit_json_prints_the_job_id_and_enqueues(env, inputs, capsys):
    code, out, _ = run_cli(capsys, *submit_args(inputs, "--steps", "3", "--json"))
    assert code == 0
    job_id = json.loads(out)["job_id"]
    [job] = task_args(queued_messages(env)[0])
    assert (job["job_id"], job["num_inference_steps"], job["prompt"]) == (job_id, 3, "a door")


@pytest.mark.parametrize("extra, message", [
    (["--steps", "0"], "--steps: 0 is outside [1, inf]"),
    (["--out", "somewhere"], "--out and --timeout need --wait"),
    (["--job-id", "abc"], "--job-id: 'abc' is not a uuid4"),
    (["--seed", "-1"], "--seed: -1 is outside"),
    (["--width", "60"], "--width: 60 is not a multiple of 8"),
    (["--format", "png", "--priority", "12"], "--priority: 12 is outside [0, 9]"),
])
def test_bad_job_input_exits_2_with_a_json_error(env, inputs, capsys, extra, message):
    code, out, _ = run_cli(capsys, *submit_args(inputs, *extra, "--json"))
    assert code == 2
    error = json.loads(out)["error"]
    assert error["code"] == schema.INVALID_INPUT and message in error["message"]
    assert queued_messages(env) == []


def test_missing_input_file_exits_2_with_a_message(env, inputs, capsys, tmp_path):
    code, out, err = run_cli(capsys, "submit", "--image", str(tmp_path / "nope.png"), "--mask", str(inputs[1]),
                             "--prompt", "p")
    assert (code, out) == (2, "")
    assert "image: no such file" in err


def test_status_exit_codes_follow_the_state(env, inputs, capsys):
    job_id = json.loads(run_cli(capsys, *submit_args(inputs, "--json"))[1])["job_id"]
    code, out, _ = run_cli(capsys, "status", job_id, "--json")
    assert (code, json.loads(out)["state"]) == (0, schema.QUEUED)

    finish(env, job_id, schema.FAILED, error={"code": schema.INTERNAL, "message": "boom"})
    code, out, _ = run_cli(capsys, "status", job_id)
    assert code == 1
    assert out.splitlines() == [f"{job_id}: failed", "error: internal: boom"]


def test_cancel_then_watch_ends_canceled(env, inputs, capsys):
    job_id = json.loads(run_cli(capsys, *submit_args(inputs, "--json"))[1])["job_id"]
    code, out, _ = run_cli(capsys, "cancel", job_id, "--json")
    assert (code, json.loads(out)) == (0, {"job_id": job_id, "cancel_requested": True, "state": schema.CANCELED})

    code, out, _ = run_cli(capsys, "watch", job_id)
    assert code == 1
    assert out.splitlines() == ["queued", "canceled", f"{job_id}: canceled",
                                "error: canceled: canceled by the client before it started"]

    code, out, _ = run_cli(capsys, "watch", job_id, "--json")
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line.get("state") for line in lines] == [schema.QUEUED, schema.CANCELED, schema.CANCELED]


def publish_result(s3, store, job_id: str, colors) -> list[bytes]:
    """Play the worker: store one PNG per color under the job's output prefix and mark the job succeeded."""
    bodies = [png_bytes(picture(color, (8, 8))) for color in colors]
    for index, body in enumerate(bodies):
        s3.put_object(Bucket=BUCKET, Key=f"jobs/{job_id}/{index}.png", Body=body)
    images = [{"uri": f"s3://{BUCKET}/jobs/{job_id}/{i}.png", "url": f"http://s3.example/{job_id}/{i}.png?sig"}
              for i in range(len(bodies))]
    finish(store, job_id, schema.SUCCEEDED, result={"images": images})
    return bodies


def publish_once_queued(s3, store, job_id: str, colors) -> None:
    """Play a worker that takes the job once the CLI has queued it (never before: that would be another job)."""
    deadline = time.monotonic() + 20
    while store.hget(state.job_key(job_id), "state") != schema.QUEUED and time.monotonic() < deadline:
        time.sleep(0.02)
    publish_result(s3, store, job_id, colors)


def test_fetch_saves_the_images_and_refuses_unfinished_jobs(env, s3, inputs, capsys, tmp_path):
    job_id = json.loads(run_cli(capsys, *submit_args(inputs, "--json"))[1])["job_id"]
    code, out, _ = run_cli(capsys, "fetch", job_id, "--out", str(tmp_path / "out"), "--json")
    assert (code, json.loads(out)["state"]) == (2, schema.QUEUED)

    bodies = publish_result(s3, env, job_id, [(1, 1, 1), (2, 2, 2)])
    code, out, _ = run_cli(capsys, "fetch", job_id, "--out", str(tmp_path / "out"))
    assert code == 0
    assert out.splitlines() == [str(tmp_path / "out" / f"{job_id}-{i}.png") for i in range(2)]
    assert [(tmp_path / "out" / f"{job_id}-{i}.png").read_bytes() for i in range(2)] == bodies


def test_submit_wait_follows_the_job_and_saves_its_images(env, s3, inputs, capsys, tmp_path):
    job_id = uuid.uuid4().hex
    worker = threading.Thread(target=publish_once_queued, args=(s3, env, job_id, [(7, 7, 7)]))
    worker.start()
    code, out, _ = run_cli(capsys, *submit_args(inputs, "--job-id", job_id, "--wait", "--timeout", "20",
                                                "--out", str(tmp_path), "--json"))
    worker.join()
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    assert [line["state"] for line in lines] == [schema.QUEUED, schema.SUCCEEDED, schema.SUCCEEDED]
    assert lines[-1]["files"] == [str(tmp_path / f"{job_id}-0.png")]
    assert Image.open(tmp_path / f"{job_id}-0.png").getpixel((0, 0)) == (7, 7, 7)


def test_submit_wait_times_out_with_exit_1(env, inputs, capsys):
    code, out, _ = run_cli(capsys, *submit_args(inputs, "--wait", "--timeout", "0.3", "--json"))
    assert code == 1
    assert json.loads(out.splitlines()[-1])["error"]["code"] == schema.TIMEOUT


def test_unreachable_redis_exits_1(inputs, capsys, monkeypatch):
    monkeypatch.setenv("INPAINT_BROKER_URL", f"redis://127.0.0.1:{devstack.free_port()}/0")
    code, out, _ = run_cli(capsys, "status", "0" * 32, "--json")
    assert code == 1
    assert json.loads(out)["error"]["code"] == cli.QUEUE_UNAVAILABLE


def test_progress_display_redraws_on_a_terminal_and_prints_lines_elsewhere():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream in (Terminal(), io.StringIO()):
        display = cli.ProgressDisplay(stream)
        for step in (0, 1, 1, 2):
            display.update(step, 2, "running")
        display.update(2, 2, "succeeded")
        display.close()
        text = stream.getvalue()
        if stream.isatty():
            assert text.count("\r") == 4 and text.endswith("succeeded [" + "#" * cli.BAR_WIDTH + "] 2/2\x1b[K\n")
        else:
            assert text.splitlines() == [
                f"running   [{'.' * 30}] 0/2", f"running   [{'#' * 15}{'.' * 15}] 1/2",
                f"running   [{'#' * 30}] 2/2", f"succeeded [{'#' * 30}] 2/2"]


def event(state_name, ts, phase="", step=0, total=0, kind="progress") -> dict:
    return {"job_id": "j", "type": kind, "state": state_name, "step": step, "total_steps": total, "ts": ts,
            "data": {}, "phase": phase}


def test_progress_display_shows_the_phase_elapsed_time_and_eta():
    stream = io.StringIO()
    display = cli.ProgressDisplay(stream)
    for item in (event("queued", 99.0, kind="state"), event("running", 100.0, "fetching", kind="state"),
                 event("running", 100.5, "encoding"), event("running", 101.0, "denoising"),
                 event("running", 102.0, "denoising", 1, 4), event("running", 103.0, "denoising", 2, 4),
                 event("running", 105.0, "decoding", 4, 4), event("running", 105.5, "uploading", 4, 4),
                 event("succeeded", 106.0, "", 4, 4, kind="state")):
        display.show(item)
    display.close()
    assert stream.getvalue().splitlines() == [
        "queued",
        "running    fetching inputs  elapsed 0.0s",
        "running    encoding  elapsed 0.5s",
        "running    denoising  elapsed 1.0s",
        f"running    denoising [{'#' * 7}{'.' * 23}] 1/4  elapsed 2.0s  ETA 3.0s",
        f"running    denoising [{'#' * 15}{'.' * 15}] 2/4  elapsed 3.0s  ETA 2.0s",
        "running    decoding  elapsed 5.0s",
        "running    uploading  elapsed 5.5s",
        f"succeeded [{'#' * 30}] 4/4"]


def test_run_paints_in_process_with_the_tiny_model(tiny_model_dir, inputs, capsys, tmp_path):
    out = tmp_path / "result" / "painted.png"
    code, stdout, _ = run_cli(capsys, "run", "--model", str(tiny_model_dir), "--image", str(inputs[0]), "--mask",
                              str(inputs[1]), "--prompt", "a door", "--steps", "2", "--num-images", "2",
                              "--seed", "1", "--out", str(out), "--json")
    assert code == 0
    files = json.loads(stdout)["files"]
    assert files == [str(out), str(out.with_name("painted-1.png"))]
    first, second = (Image.open(f).convert("RGB") for f in files)
    assert first.size == second.size == (64, 64)
    assert first.tobytes() != second.tobytes()  # seed 1 and seed 2


def test_run_refuses_bad_options_before_loading_the_model(inputs, capsys, tmp_path):
    code, out, _ = run_cli(capsys, "run", "--model", str(tmp_path / "no-model"), "--image", str(inputs[0]),
                           "--mask", str(inputs[1]), "--prompt", "p", "--out", str(tmp_path / "out.unknown"),
                           "--json")
    assert code == 2
    assert "needs an image file extension" in json.loads(out)["error"]["message"]


def test_run_without_the_worker_extra_says_what_to_install(inputs, tmp_path):
    # A client-only install: torch cannot be imported (a stand-in package that raises, first on the path).
    blocker = tmp_path / "no-torch" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker.parent), str(ROOT)])}
    result = subprocess.run([sys.executable, "-m", "api_client.cli", "run", "--model", "m", "--image",
                             str(inputs[0]), "--mask", str(inputs[1]), "--prompt", "p", "--out",
                             str(tmp_path / "o.png")], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2, result.stderr
    assert "pip install 'inpaint-fleet[worker]'" in result.stderr and "Traceback" not in result.stderr


def test_run_with_a_missing_model_exits_1_model_unavailable(inputs, capsys, tmp_path):
    code, out, _ = run_cli(capsys, "run", "--model", str(tmp_path / "no-model"), "--image", str(inputs[0]),
                           "--mask", str(inputs[1]), "--prompt", "p", "--out", str(tmp_path / "o.png"), "--json")
    assert code == 1
    assert json.loads(out)["error"]["code"] == "model_unavailable"


def test_run_with_a_non_image_input_exits_2_without_a_traceback(tiny_model_dir, inputs, capsys, tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    code, _, err = run_cli(capsys, "run", "--model", str(tiny_model_dir), "--image", str(not_an_image),
                           "--mask", str(inputs[1]), "--prompt", "p", "--out", str(tmp_path / "o.png"))
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_run_with_a_decompression_bomb_exits_2_without_a_traceback(tiny_model_dir, inputs, capsys, tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_with_header_only(40000, 40000))
    code, out, _ = run_cli(capsys, "run", "--model", str(tiny_model_dir), "--image", str(bomb), "--mask",
                           str(inputs[1]), "--prompt", "p", "--out", str(tmp_path / "o.png"), "--json")
    assert code == 2
    error = json.loads(out)["error"]
    assert error["code"] == schema.LIMIT_EXCEEDED and "decompression bomb" in error["message"]


@pytest.mark.parametrize("command", ["status", "watch"])
def test_status_and_watch_of_an_unknown_job_exit_1(env, capsys, command):
    code, out, _ = run_cli(capsys, command, uuid.uuid4().hex, "--json")
    assert code == 1
    assert json.loads(out)["error"]["code"] == cli.JOB_NOT_FOUND


def test_inputs_over_the_limits_exit_2_before_anything_is_sent(env, s3, inputs, tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_with_header_only(40000, 40000))   # PIL's DecompressionBombError on open
    small_mask = tmp_path / "small-mask.png"
    picture((255, 255, 255), (64, 32)).save(small_mask)
    long_prompt = tmp_path / "prompt.txt"
    long_prompt.write_text("x" * 1_000_000)
    cases = [
        (["--image", str(bomb), "--mask", str(inputs[1]), "--prompt", "p"], schema.LIMIT_EXCEEDED,
         f"inpaint: error: --image {bomb}: Image size (1600000000 pixels) exceeds limit of 178956970 pixels, could "
         "be decompression bomb DOS attack. The service's limit is 1048576 pixels (INPAINT_MAX_PIXELS)."),
        (["--image", str(inputs[0]), "--mask", str(small_mask), "--prompt", "p"], schema.INVALID_INPUT,
         "inpaint: error: --mask: size 64x32 differs from the image's 64x64"),
        (["--image", str(inputs[0]), "--mask", str(inputs[1]), "--prompt-file", str(long_prompt)],
         schema.LIMIT_EXCEEDED, "inpaint: error: --prompt: 1000000 characters is over the limit of 2000 characters"),
    ]
    uploaded_before = s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])
    for argv, code, message in cases:
        done = inpaint("submit", *argv)
        assert (done.returncode, done.stdout) == (2, "")
        assert done.stderr.startswith(message) and len(done.stderr.splitlines()) == 1, done.stderr
        as_json = json.loads(inpaint("submit", *argv, "--json").stdout)["error"]
        assert as_json["code"] == code
    assert queued_messages(env) == [] and env.dbsize() == 0
    assert s3.list_objects_v2(Bucket=BUCKET).get("Contents", []) == uploaded_before


def test_prompts_from_a_file_or_standard_input(env, inputs, tmp_path):
    prompt_file, negative_file = tmp_path / "prompt.txt", tmp_path / "negative.txt"
    prompt_file.write_text("a red door\nwith brass handles\n", encoding="utf-8")
    negative_file.write_text("blurry, déformé\n", encoding="utf-8")
    image, mask = str(inputs[0]), str(inputs[1])
    done = inpaint("submit", "--image", image, "--mask", mask, "--prompt-file", str(prompt_file),
                   "--negative-prompt", "-", stdin="low quality\n")
    done_from_stdin = inpaint("submit", "--image", image, "--mask", mask, "--prompt", "-",
                              "--negative-prompt-file", str(negative_file), stdin="a green door\n")
    assert (done.returncode, done_from_stdin.returncode) == (0, 0), done.stderr + done_from_stdin.stderr
    jobs = {job["job_id"]: job for job in (task_args(message)[0] for message in queued_messages(env))}
    first, second = jobs[done.stdout.strip()], jobs[done_from_stdin.stdout.strip()]
    assert (first["prompt"], first["negative_prompt"]) == ("a red door\nwith brass handles", "low quality")
    assert (second["prompt"], second["negative_prompt"]) == ("a green door", "blurry, déformé")


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "-", "--negative-prompt", "-"],
     "--negative-prompt -: standard input can give only one of --prompt and --negative-prompt"),
    (["--prompt-file", "/no/such/prompt.txt"], "--prompt-file: no such file: /no/such/prompt.txt"),
])
def test_prompt_sources_that_cannot_work_exit_2(env, inputs, capsys, argv, message):
    code, _, err = run_cli(capsys, "submit", "--image", str(inputs[0]), "--mask", str(inputs[1]), *argv)
    assert code == 2 and err.strip() == f"inpaint: error: {message}"


def test_prompt_and_prompt_file_exclude_each_other(inputs, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["submit", "--image", "a", "--mask", "m", "--prompt", "p", "--prompt-file", "f"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_help_gives_the_defaults_and_what_width_does_with_keep_unmasked():
    text = " ".join(inpaint("submit", "--help").stdout.split())   # argparse wraps lines
    for expected in ("denoising steps (default 50;", "guidance scale (default 7.5)", "(default 1.0)",
                     "(default: the model's own)", "images per job (default 1)", "--prompt-file PATH",
                     "the result keeps the image's size; --no-keep-unmasked returns this size",
                     "the Python library's keep_unmasked defaults to off"):
        assert expected in text, expected


def test_status_and_wait_show_where_the_result_is(env, s3, inputs, capsys):
    job_id = json.loads(run_cli(capsys, *submit_args(inputs, "--json"))[1])["job_id"]
    publish_result(s3, env, job_id, [(1, 1, 1), (2, 2, 2)])
    code, out, _ = run_cli(capsys, "status", job_id)
    assert code == 0
    assert out.splitlines() == [
        f"{job_id}: succeeded", f"image 0: s3://{BUCKET}/jobs/{job_id}/0.png",
        f"  url: http://s3.example/{job_id}/0.png?sig", f"image 1: s3://{BUCKET}/jobs/{job_id}/1.png",
        f"  url: http://s3.example/{job_id}/1.png?sig"]

    waited = uuid.uuid4().hex
    worker = threading.Timer(0.3, publish_result, (s3, env, waited, [(7, 7, 7)]))
    worker.start()
    code, out, _ = run_cli(capsys, *submit_args(inputs, "--job-id", waited, "--wait", "--timeout", "20"))
    worker.join()
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"{waited}: submitted"   # the id comes first, before any progress
    assert lines[-3:] == [f"{waited}: succeeded", f"image 0: s3://{BUCKET}/jobs/{waited}/0.png",
                          f"  url: http://s3.example/{waited}/0.png?sig"]


def test_cancel_from_the_command_line(env, s3, inputs):
    unknown = inpaint("cancel", uuid.uuid4().hex, "--json")
    assert unknown.returncode == 1 and json.loads(unknown.stdout)["error"]["code"] == cli.JOB_NOT_FOUND

    done_job = json.loads(inpaint(*submit_args(inputs, "--json")).stdout)["job_id"]
    publish_result(s3, env, done_job, [(1, 1, 1)])
    before = env.hgetall(state.job_key(done_job)), env.xlen(state.job_events_key(done_job))
    finished = inpaint("cancel", done_job)
    assert (finished.returncode, finished.stdout) == (1, "")
    assert finished.stderr.strip() == f"inpaint: error: {done_job}: already succeeded; nothing to cancel"
    assert (env.hgetall(state.job_key(done_job)), env.xlen(state.job_events_key(done_job))) == before
    assert not env.exists(state.cancel_key(done_job))

    queued = json.loads(inpaint(*submit_args(inputs, "--json")).stdout)["job_id"]
    canceled = inpaint("cancel", queued)
    assert (canceled.returncode, canceled.stdout.strip()) == (0, f"{queued}: canceled (it had not started)")
    assert env.hget(state.job_key(queued), "state") == schema.CANCELED

    running = json.loads(inpaint(*submit_args(inputs, "--json")).stdout)["job_id"]
    env.hset(state.job_key(running), "state", schema.RUNNING)   # as a worker's claim leaves it
    requested = inpaint("cancel", running, "--json")
    assert requested.returncode == 0
    assert json.loads(requested.stdout) == {"job_id": running, "cancel_requested": True, "state": schema.RUNNING}
    assert env.get(state.cancel_key(running)) == "1"


def test_ctrl_c_while_waiting_cancels_the_job(env, inputs):
    """No worker runs here: the job stays queued, so Ctrl-C ends it canceled at once (tests/service has the
    running case)."""
    process = subprocess.Popen([sys.executable, "-m", "api_client.cli", *submit_args(inputs, "--wait")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first_line = process.stdout.readline()   # printed once the job is accepted
        job_id = first_line.split(":")[0]
        assert first_line == f"{job_id}: submitted\n" and schema.is_job_id(job_id)
        deadline = time.monotonic() + 30
        while env.xlen(state.job_events_key(job_id)) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)   # inside the wait loop by now
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == cli.EXIT_INTERRUPTED == 130, err
    assert f"interrupted: {job_id}: canceled (it had not started)" in out
    assert env.hget(state.job_key(job_id), "state") == schema.CANCELED


def test_a_missing_bucket_exits_1_naming_it(env, inputs, monkeypatch):
    monkeypatch.setenv("INPAINT_BUCKET", "no-such-bucket")
    done = inpaint(*submit_args(inputs))
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.startswith("inpaint: error: bucket 'no-such-bucket' does not exist at http://127.0.0.1:")
    assert "aws s3 mb s3://no-such-bucket" in done.stderr and len(done.stderr.splitlines()) == 1
