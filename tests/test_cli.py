"""The `inpaint` command: argument parsing, --json output and exit codes (0 ok, 1 job failed/canceled, 2 usage or
input error), against the same private redis-server and moto S3 as tests/test_client.py."""
import io
import json
import subprocess
import sys
import threading
import uuid

import pytest
from PIL import Image

from api_client import cli, schema
from tests.test_client import (BUCKET, QUEUE, finish, picture, png_bytes, queued_messages, s3, services, store,
                               task_args)
from tests import devstack

__all__ = ["services", "store", "s3"]  # fixtures shared with tests/test_client.py


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
    images = [{"uri": f"s3://{BUCKET}/jobs/{job_id}/{i}.png"} for i in range(len(bodies))]
    finish(store, job_id, schema.SUCCEEDED, result={"images": images})
    return bodies


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
    worker = threading.Timer(0.3, publish_result, (s3, env, job_id, [(7, 7, 7)]))
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
    code = ("import sys; sys.modules['worker.local_run'] = None\n"
            "from api_client import cli\n"
            f"sys.exit(cli.main(['run', '--model', 'm', '--image', {str(inputs[0])!r}, '--mask', "
            f"{str(inputs[1])!r}, '--prompt', 'p', '--out', {str(tmp_path / 'o.png')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "pip install 'inpaint-fleet[worker]'" in result.stderr


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


@pytest.mark.parametrize("command", ["status", "watch"])
def test_status_and_watch_of_an_unknown_job_exit_1(env, capsys, command):
    code, out, _ = run_cli(capsys, command, uuid.uuid4().hex, "--json")
    assert code == 1
    assert json.loads(out)["error"]["code"] == cli.JOB_NOT_FOUND
