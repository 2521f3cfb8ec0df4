"""`inpaint-worker` / `python -m worker`: its defaults, and a clear refusal of bad settings."""
import os
import subprocess
import sys

from worker.__main__ import worker_argv
from worker.settings import Settings


def test_defaults_come_first_so_given_options_override_them():
    argv = worker_argv(Settings.from_env({"INPAINT_QUEUE": "gpu-a"}), ["--pool", "prefork", "-n", "w1@%h"])
    assert argv[:11] == ["worker", "--pool", "solo", "--concurrency", "1", "--prefetch-multiplier", "1",
                         "--task-events", "--queues", "gpu-a", "--loglevel"]
    assert argv[-4:] == ["--pool", "prefork", "-n", "w1@%h"]


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
