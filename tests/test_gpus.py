"""worker.gpus: GPU selection against a fake device count, the per-GPU plan, and the supervisor with real children."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from worker.gpus import (ProcessSpec, check_device, parse_gpus, plan_processes, run_processes, split_gpus_option,
                         visible_devices)

SMI_TWO_GPUS = """GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-11111111-2222-3333-4444-555555555555)
GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-66666666-7777-8888-9999-000000000000)
"""
SMI_ONE_GPU_IN_MIG_MODE = """GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-11111111-2222-3333-4444-555555555555)
  MIG 3g.40gb     Device  0: (UUID: MIG-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee)
  MIG 3g.40gb     Device  1: (UUID: MIG-ffffffff-0000-1111-2222-333333333333)
GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-66666666-7777-8888-9999-000000000000)
"""

# A stand-in for a worker process: records its pinning and argv, then waits for SIGTERM (exit 0) or exits with
# the status given by the EXIT_WITH variable (once the children named in EXIT_AFTER have started).
CHILD = textwrap.dedent("""
    import json, os, signal, sys, time
    out = os.path.join(os.environ["OUT_DIR"], os.environ["CUDA_VISIBLE_DEVICES"] or "cpu")
    def on_term(signum, frame):
        with open(out + ".term", "w") as f:
            f.write(signal.Signals(signum).name)
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    with open(out + ".json", "w") as f:
        json.dump({"argv": sys.argv[1:], "cuda": os.environ["CUDA_VISIBLE_DEVICES"],
                   "metrics_port": os.environ.get("INPAINT_METRICS_PORT"), "gpus": os.environ["INPAINT_GPUS"],
                   "process_group": os.getpgrp()}, f)
    for other in filter(None, os.environ.get("EXIT_AFTER", "").split(",")):  # the others up, handlers set
        while not os.path.exists(os.path.join(os.environ["OUT_DIR"], other + ".json")):
            time.sleep(0.02)
    if "EXIT_WITH" in os.environ:
        sys.exit(int(os.environ["EXIT_WITH"]))
    time.sleep(60)
    sys.exit(5)
""")


def test_all_lists_none():
    assert parse_gpus("all", device_count=4) == [0, 1, 2, 3]
    assert parse_gpus(" 2, 0 ", device_count=4) == [2, 0]
    assert parse_gpus("1", device_count=2) == [1]
    assert parse_gpus("none", device_count=0) == []
    assert parse_gpus("NONE", device_count=8) == []


@pytest.mark.parametrize("spec, count, message", [
    ("2", 2, "GPU 2 is out of range; this host has 2 \\(available: 0-1\\)"),
    ("0,5", 4, "GPU 5 is out of range"),
    ("0", 0, "this host has 0 \\(available: none\\)"),
    ("", 2, "empty list"),
    (" , ", 2, "empty list"),
    ("0,,1", 2, "'' is not a GPU index"),
    ("-1", 2, "'-1' is not a GPU index"),
    ("gpu0", 2, "'gpu0' is not a GPU index"),
    ("1,1", 2, "listed twice"),
    ("all", 0, "no GPU found.*--gpus none"),
])
def test_bad_selections_are_clear_errors(spec, count, message):
    with pytest.raises(ValueError, match=message):
        parse_gpus(spec, device_count=count)


def test_one_process_per_gpu_pinned_with_its_own_name_and_port():
    specs = plan_processes([0, 2, 3], ["-l", "INFO"], device_ids=["0", "1", "2", "3"], metrics_port=9400,
                           command=["python", "-m", "worker"])
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in specs] == ["0", "2", "3"]
    assert [s.hostname for s in specs] == ["inpaint@%h-gpu0", "inpaint@%h-gpu2", "inpaint@%h-gpu3"]
    assert [s.env["INPAINT_METRICS_PORT"] for s in specs] == ["9400", "9401", "9402"]
    assert all(s.env["INPAINT_GPUS"] == "" for s in specs)
    assert all(s.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID" for s in specs)  # nvidia-smi's numbering, not CUDA's
    assert specs[1].argv == ["python", "-m", "worker", "-l", "INFO", "--hostname", "inpaint@%h-gpu2",
                             "--concurrency", "1"]


def test_device_ids_map_positions_to_visible_devices():
    specs = plan_processes(parse_gpus("all", 2), [], device_ids=["4", "7"])
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in specs] == ["4", "7"]
    assert all("INPAINT_METRICS_PORT" not in s.env for s in specs)
    with pytest.raises(ValueError, match="GPU 2 is out of range"):
        plan_processes([2], [], device_ids=["4", "7"])


def test_none_plans_one_cpu_process_with_no_gpu_visible():
    (spec,) = plan_processes([], [], metrics_port=9400, command=["w"])
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "" and spec.hostname == "inpaint@%h-cpu"
    assert spec.env["INPAINT_METRICS_PORT"] == "9400"


@pytest.mark.parametrize("device", ["", "cuda", "CUDA:0"])
def test_a_device_each_gpu_process_can_use_is_accepted(device):
    check_device(device, [0, 1])


@pytest.mark.parametrize("device, gpus, message", [
    ("cuda:1", [0, 1], "INPAINT_DEVICE='cuda:1' with --gpus: each worker process sees only its own GPU, as cuda:0"),
    ("cpu", [0], "sees only its own GPU.*set INPAINT_DEVICE=cuda or leave it empty"),
    ("cuda", [], "sees no GPU; set INPAINT_DEVICE=cpu or leave it empty"),
])
def test_a_device_the_gpu_processes_cannot_use_is_refused(device, gpus, message):
    with pytest.raises(ValueError, match=message):
        check_device(device, gpus)


@pytest.mark.parametrize("option", ["-n", "--hostname", "--hostname=x@y", "-c", "--concurrency"])
def test_per_process_options_are_refused(option):
    with pytest.raises(ValueError, match="set per process by --gpus"):
        plan_processes([0], ["-l", "INFO", option, "2"])


def test_split_gpus_option():
    assert split_gpus_option(["--gpus", "0,1", "-l", "INFO"]) == ("0,1", ["-l", "INFO"])
    assert split_gpus_option(["-l", "INFO", "--gpus=all"]) == ("all", ["-l", "INFO"])
    assert split_gpus_option(["-l", "INFO"], default="none") == ("none", ["-l", "INFO"])
    with pytest.raises(ValueError, match="--gpus: missing value"):
        split_gpus_option(["--gpus"])


def test_visible_devices_sources():
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "GPU-abc, 1, -1, 4"}) == ["GPU-abc", "1"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_devices({}, nvidia_smi=SMI_TWO_GPUS) == ["0", "1"]
    assert visible_devices({}, nvidia_smi=SMI_ONE_GPU_IN_MIG_MODE) == [
        "MIG-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", "MIG-ffffffff-0000-1111-2222-333333333333", "1"]
    assert visible_devices({}, nvidia_smi="") == []


def child_specs(tmp_path: Path, count: int, extra_env: dict | None = None) -> list[ProcessSpec]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    specs = plan_processes(list(range(count)), ["-l", "INFO"], metrics_port=9400,
                           command=[sys.executable, str(script)])
    return [ProcessSpec(argv=s.argv, env={**s.env, "OUT_DIR": str(tmp_path), **(extra_env or {}).get(i, {})},
                        hostname=s.hostname) for i, s in enumerate(specs)]


def wait_for(paths: list[Path], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline, f"children did not start: {[p for p in paths if not p.exists()]}"
        time.sleep(0.05)


def supervisor_process(specs: list[ProcessSpec]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import json, sys
        from worker.gpus import ProcessSpec, run_processes
        specs = [ProcessSpec(**item) for item in json.loads({json.dumps(json.dumps([vars(s) for s in specs]))})]
        sys.exit(run_processes(specs, poll_s=0.05))
    """)])


def test_supervisor_forwards_sigterm_to_every_child(tmp_path):
    specs = child_specs(tmp_path, 3)
    supervisor = supervisor_process(specs)
    try:
        wait_for([tmp_path / f"{i}.json" for i in range(3)])
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(20) == 0
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
    for i in range(3):
        assert (tmp_path / f"{i}.term").read_text() == "SIGTERM"
        seen = json.loads((tmp_path / f"{i}.json").read_text())
        assert seen["cuda"] == str(i) and seen["metrics_port"] == str(9400 + i) and seen["gpus"] == ""
        assert seen["argv"][-4:] == ["--hostname", f"inpaint@%h-gpu{i}", "--concurrency", "1"]
        # Not the terminal's group (which the supervisor shares): a Ctrl-C reaches the child once, forwarded.
        assert seen["process_group"] != os.getpgrp()


def test_supervisor_waits_for_all_and_reports_the_failure(tmp_path):
    # 1 fails only once the others are up: a SIGTERM from the supervisor could otherwise stop one before it starts.
    specs = child_specs(tmp_path, 3, {0: {"EXIT_WITH": "0"}, 1: {"EXIT_WITH": "3", "EXIT_AFTER": "0,2"},
                                      2: {"EXIT_WITH": "0"}})
    handler_before = signal.getsignal(signal.SIGTERM)
    assert run_processes(specs, poll_s=0.05) == 3
    assert all((tmp_path / f"{i}.json").exists() for i in range(3))
    assert signal.getsignal(signal.SIGTERM) is handler_before


def test_a_failed_child_stops_the_others_so_the_set_restarts(tmp_path):
    specs = child_specs(tmp_path, 3, {1: {"EXIT_WITH": "3", "EXIT_AFTER": "0,2"}})  # 0 and 2 run until SIGTERM
    started = time.monotonic()
    assert run_processes(specs, poll_s=0.05) == 3
    assert time.monotonic() - started < 30  # not the children's own 60 s
    assert [(tmp_path / f"{i}.term").read_text() for i in (0, 2)] == ["SIGTERM", "SIGTERM"]


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_children_get_sigterm_when_the_supervisor_is_killed(tmp_path):
    specs = child_specs(tmp_path, 2)
    supervisor = supervisor_process(specs)
    try:
        wait_for([tmp_path / f"{i}.json" for i in range(2)])
        supervisor.kill()  # SIGKILL: no handler of the supervisor's runs
        supervisor.wait(10)
        wait_for([tmp_path / f"{i}.term" for i in range(2)])
    finally:
        if supervisor.poll() is None:
            supervisor.kill()

def test_child_killed_by_a_signal_counts_as_128_plus_n(tmp_path):
    specs = [ProcessSpec(argv=[sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])]
    assert run_processes(specs, poll_s=0.05) == 128 + signal.SIGKILL


def test_no_processes_is_an_error():
    with pytest.raises(ValueError, match="no processes"):
        run_processes([])


def test_supervise_runs_the_planned_processes_and_logs_json(tmp_path):
    script = tmp_path / "child.py"
    script.write_text("import os, sys; sys.exit(0 if os.environ['CUDA_VISIBLE_DEVICES'] == '' else 4)")
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from worker import gpus
        sys.exit(gpus.supervise("none", [], metrics_port=9400, command=[sys.executable, {str(script)!r}]))
    """)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert [r["message"] for r in records] == ["supervising worker processes", "worker process started",
                                                "worker process exited"]
    node = f"inpaint@{socket.gethostname()}-cpu"   # as Celery expands %h
    assert records[0]["processes"] == [node] and records[1]["hostname"] == node and records[2]["returncode"] == 0
