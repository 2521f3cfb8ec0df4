"""`inpaint-worker` / `python -m worker`: its defaults and help, a clear refusal of bad settings, and of an install
without the [worker] extra."""
import os
import subprocess
import sys

import pytest

from worker.__main__ import worker_argv
from worker.settings import Settings


def test_defaults_come_first_so_given_options_override_them():
    argv = worker_argv(Settings.from_env({"INPAINT_QUEUE": "gpu-a"}), ["--pool", "prefork", "-n", "w1@%h"])
    assert argv[:12] == ["--quiet", "worker", "--pool", "solo", "--concurrency", "1", "--prefetch-multiplier", "1",
                         "--task-events", "--queues", "gpu-a", "--loglevel"]
    assert argv[-4:] == ["--pool", "prefork", "-n", "w1@%h"]
    # Celery's start-up banner is plain text: printed with text logs only.
    assert worker_argv(Settings.from_env({"INPAINT_LOG_FORMAT": "text"}), [])[0] == "worker"


def test_bad_setting_stops_the_worker_with_a_clear_message():
    env = {**os.environ, "INPAINT_MAX_STEPS": "lots", "INPAINT_BROKER_URL": "redis://:pw@127.0.0.1:1/0"}
    done = subprocess.run([sys.executable, "-m", "worker"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip() == "inpaint-worker: INPAINT_MAX_STEPS='lots': expected an integer"


def test_bad_gpus_option_stops_the_worker_with_a_clear_message():
    done = subprocess.run([sys.executable, "-m", "worker", "--gpus"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().startswith("inpaint-worker: --gpus: missing value")


def test_an_indexed_device_with_gpus_stops_the_supervisor_with_a_clear_message():
    env = {**os.environ, "INPAINT_DEVICE": "cuda:1", "CUDA_VISIBLE_DEVICES": "0,1"}
    done = subprocess.run([sys.executable, "-m", "worker", "--gpus", "all"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().startswith("inpaint-worker: INPAINT_DEVICE='cuda:1' with --gpus: each worker process")


def test_help_shows_our_options_and_defaults_before_celerys():
    env = {**os.environ, "INPAINT_QUEUE": "gpu-a"}
    done = subprocess.run([sys.executable, "-m", "worker", "--help"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert text.startswith("usage: inpaint-worker [--gpus all|none|0,1,...] [celery worker options]")
    assert "--gpus SPEC" in text
    assert "--pool solo --concurrency 1 --prefetch-multiplier 1 --task-events --queues gpu-a --loglevel INFO" in text
    assert text.index("--gpus SPEC") < text.index("--concurrency 1") < text.index("`celery worker --help`")
    assert "number of CPUs" not in text   # not Celery's generic help


@pytest.mark.parametrize("argv", [[], ["--gpus", "all"]])
def test_a_client_only_install_says_which_extra_the_worker_needs(argv):
    # torch made unimportable, as in `pip install inpaint-fleet` without [worker]; --help still works there.
    code = ("import sys; sys.modules['torch'] = None\n"
            f"sys.argv = ['inpaint-worker', *{argv!r}]\n"
            "from worker.__main__ import main; main()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.strip() == ("inpaint-worker: this install has the client only; a worker needs the [worker] "
                                   "extra (missing: torch): pip install 'inpaint-fleet[worker]'")
    helped = subprocess.run([sys.executable, "-c", code.replace(f"{argv!r}", "['--help']")], capture_output=True,
                            text=True, timeout=60)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: inpaint-worker")
