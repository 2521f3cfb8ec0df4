"""One Celery worker process per GPU on a multi-GPU host, and the supervisor that runs them.

    inpaint-worker --gpus all|0,1,...|none [celery worker options]      (or INPAINT_GPUS)

`parse_gpus(spec, device_count)` turns the option into device positions; `plan_processes(gpus, argv)` gives one
`ProcessSpec` per GPU: pinned with CUDA_VISIBLE_DEVICES (each process sees its GPU as cuda:0), its own node name
`inpaint@%h-gpu<i>`, concurrency 1, metrics on INPAINT_METRICS_PORT + i. `--gpus none` plans one process with no
GPU visible (the CPU). `run_processes(specs)` starts them, forwards SIGTERM/SIGINT (Celery's warm shutdown: the
running job finishes first) and returns when all have exited: 0, or the first failure's status. A process that
fails (crash, hard time limit, lost GPU) makes the supervisor stop the others the same way and exit with its
status, so that what restarts the supervisor (container, unit) restarts the whole set rather than leaving a GPU
idle; and children die with their supervisor, whatever kills it.

The supervisor never touches CUDA: it counts devices from CUDA_VISIBLE_DEVICES or `nvidia-smi -L`, and only
falls back to torch.cuda.device_count() (NVML, no CUDA context) when neither is there. The children are started
with fork + exec, so nothing of the parent's state reaches them anyway.
"""
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

__all__ = ["ProcessSpec", "GPUS_ENV", "split_gpus_option", "parse_gpus", "visible_devices", "check_device",
           "plan_processes", "run_processes", "supervise"]

log = logging.getLogger("inpaint.gpus")

GPUS_ENV = "INPAINT_GPUS"
METRICS_PORT_ENV = "INPAINT_METRICS_PORT"
HOSTNAME_OPTIONS = ("-n", "--hostname")
CONCURRENCY_OPTIONS = ("-c", "--concurrency")
POLL_S = 0.2
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
NVIDIA_SMI_TIMEOUT_S = 30
# `nvidia-smi -L` lines: "GPU 0: NVIDIA H100 ... (UUID: GPU-...)" and, under a GPU in MIG mode,
# "  MIG 3g.40gb Device 0: (UUID: MIG-...)". A MIG slice can only be chosen by its UUID.
_SMI_GPU = re.compile(r"^GPU (\d+): .*\(UUID: (GPU-[0-9a-fA-F-]+)\)")
_SMI_MIG = re.compile(r"^\s+MIG .*\(UUID: (MIG-[0-9a-zA-Z/-]+)\)")


@dataclass(frozen=True)
class ProcessSpec:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)   # set on top of the supervisor's own environment
    hostname: str = ""                                   # Celery's node name pattern (%h: this host's name)

    @property
    def node_name(self) -> str:
        """The node name Celery will report (Flower, `celery inspect`), for the supervisor's logs."""
        return self.hostname.replace("%h", socket.gethostname())


def split_gpus_option(argv: list[str], default: str = "") -> tuple[str, list[str]]:
    """(the --gpus value, or `default` when absent; the other arguments, for Celery)."""
    spec, rest, index = default, [], 0
    while index < len(argv):
        argument = argv[index]
        if argument == "--gpus":
            if index + 1 == len(argv):
                raise ValueError("--gpus: missing value (all, none, or a list such as 0,1)")
            spec, index = argv[index + 1], index + 2
            continue
        if argument.startswith("--gpus="):
            spec = argument.split("=", 1)[1]
        else:
            rest.append(argument)
        index += 1
    return spec, rest


def parse_gpus(spec: str, device_count: int | None = None) -> list[int]:
    """Device positions named by `all`, `none` (no GPU: []) or a comma-separated list such as `0,2`."""
    text = spec.strip().lower()
    if text == "none":
        return []
    count = len(visible_devices()) if device_count is None else device_count
    if text == "all":
        if count == 0:
            raise ValueError("--gpus all: no GPU found on this host; use --gpus none to run on the CPU")
        return list(range(count))
    items = [item.strip() for item in text.split(",")]
    if not text or not any(items):
        raise ValueError(f"--gpus {spec!r}: empty list; give all, none, or GPU indices such as 0,1")
    gpus = [_gpu_index(item, spec, count) for item in items]
    if len(set(gpus)) != len(gpus):
        raise ValueError(f"--gpus {spec!r}: a GPU is listed twice")
    return gpus


def _gpu_index(item: str, spec: str, count: int) -> int:
    if not item.isdigit():
        raise ValueError(f"--gpus {spec!r}: {item!r} is not a GPU index (a whole number from 0)")
    index = int(item)
    if index >= count:
        available = f"0-{count - 1}" if count else "none"
        raise ValueError(f"--gpus {spec!r}: GPU {index} is out of range; this host has {count} (available: "
                         f"{available})")
    return index


def visible_devices(environ: dict | None = None, nvidia_smi: str | None = None) -> list[str]:
    """The CUDA_VISIBLE_DEVICES value of each device a process can be pinned to.

    CUDA_VISIBLE_DEVICES when set (its entries, up to the first negative one, as CUDA reads it); else the
    output of `nvidia-smi -L` (`nvidia_smi` is that output, for tests): GPU indices, or the MIG UUIDs of GPUs in
    MIG mode; else torch.cuda.device_count() indices; without torch, no device.
    """
    env = os.environ if environ is None else environ
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return _cuda_visible_entries(listed)
    output = _nvidia_smi_list() if nvidia_smi is None else nvidia_smi
    if output is not None:
        return _devices_from_smi(output)
    try:
        import torch
    except ImportError:
        return []
    return [str(index) for index in range(torch.cuda.device_count())]


def _cuda_visible_entries(listed: str) -> list[str]:
    entries = []
    for entry in (item.strip() for item in listed.split(",")):
        if not entry or entry.startswith("-"):
            break
        entries.append(entry)
    return entries


def _nvidia_smi_list() -> str | None:
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return None
    try:
        done = subprocess.run([executable, "-L"], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        log.warning("nvidia-smi -L failed", extra={"error": str(error)})
        return None
    if done.returncode != 0:  # e.g. no driver in this container: no GPU rather than a crash
        log.warning("nvidia-smi -L failed", extra={"returncode": done.returncode, "stderr": done.stderr[-500:]})
        return ""
    return done.stdout


def _devices_from_smi(output: str) -> list[str]:
    devices, gpu_index, gpu_migs = [], None, []
    for line in output.splitlines() + ["GPU end"]:
        gpu, mig = _SMI_GPU.match(line), _SMI_MIG.match(line)
        if mig:
            gpu_migs.append(mig.group(1))
        elif gpu or line == "GPU end":
            if gpu_index is not None:
                devices.extend(gpu_migs or [gpu_index])
            gpu_index, gpu_migs = (gpu.group(1) if gpu else None), []
    return devices


def check_device(device: str, gpus: list[int]) -> None:
    """Refuse an INPAINT_DEVICE the planned processes could not honour: each process sees only its own GPU, as
    cuda:0, and the `--gpus none` process sees none."""
    wanted = device.strip().lower()
    allowed = ("", "cuda", "cuda:0") if gpus else ("", "cpu")
    if wanted not in allowed:
        sees = "only its own GPU, as cuda:0" if gpus else "no GPU"
        raise ValueError(f"INPAINT_DEVICE={device!r} with --gpus: each worker process sees {sees}; set "
                         f"INPAINT_DEVICE={allowed[1]} or leave it empty")


def plan_processes(gpus: list[int], argv: list[str], device_ids: list[str] | None = None, metrics_port: int = 0,
                   command: list[str] | None = None) -> list[ProcessSpec]:
    """One worker process per GPU position in `gpus` (none: one CPU process).

    `device_ids` maps a position to its CUDA_VISIBLE_DEVICES value (visible_devices(); default: the position
    itself); `command` starts a worker (default: this interpreter's `-m worker`), `argv` are Celery options.
    """
    for option in HOSTNAME_OPTIONS + CONCURRENCY_OPTIONS:
        if any(arg == option or arg.startswith(option + "=") for arg in argv):
            raise ValueError(f"{option}: set per process by --gpus (one process per GPU, concurrency 1); "
                             f"remove it from the worker options")
    ids = device_ids if device_ids is not None else [str(position) for position in range(max(gpus, default=-1) + 1)]
    for position in gpus:
        if not 0 <= position < len(ids):
            raise ValueError(f"--gpus: GPU {position} is out of range; this host has {len(ids)}")
    base = command or [sys.executable, "-m", "worker"]
    slots = [(f"gpu{position}", ids[position]) for position in gpus] or [("cpu", "")]
    specs = []
    for index, (name, device) in enumerate(slots):
        hostname = f"inpaint@%h-{name}"
        # INPAINT_GPUS is emptied so the child runs a worker itself instead of supervising again. GPU indices are
        # nvidia-smi's, which counts in PCI bus order; CUDA's default order (fastest first) may differ.
        env = {"CUDA_VISIBLE_DEVICES": device, "CUDA_DEVICE_ORDER": "PCI_BUS_ID", GPUS_ENV: ""}
        if metrics_port:
            env[METRICS_PORT_ENV] = str(metrics_port + index)
        specs.append(ProcessSpec(argv=[*base, *argv, "--hostname", hostname, "--concurrency", "1"], env=env,
                                 hostname=hostname))
    return specs


def run_processes(specs: list[ProcessSpec], poll_s: float = POLL_S) -> int:
    """Start every process, forward SIGTERM/SIGINT to them, wait for all; 0, or the first failure's status."""
    if not specs:
        raise ValueError("run_processes: no processes to run")
    children: list[subprocess.Popen] = []

    def forward(signum, frame):
        log.info("forwarding signal", extra={"signal": signal.Signals(signum).name, "processes": len(children)})
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        for spec in specs:
            # Its own session: a Ctrl-C in a terminal reaches only the supervisor, which forwards it once (a second
            # SIGINT would be Celery's cold shutdown, abandoning the running job).
            children.append(subprocess.Popen(spec.argv, env={**os.environ, **spec.env}, start_new_session=True,
                                             preexec_fn=_die_with_parent))
            log.info("worker process started", extra={"pid": children[-1].pid, "hostname": spec.node_name,
                                                      "cuda_visible_devices": spec.env.get("CUDA_VISIBLE_DEVICES")})
        return _wait_all(children, specs, poll_s)
    except BaseException:
        _stop(children)
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _wait_all(children: list[subprocess.Popen], specs: list[ProcessSpec], poll_s: float) -> int:
    statuses: dict[int, int] = {}
    while len(statuses) < len(children):
        for index, child in enumerate(children):
            if index not in statuses and child.poll() is not None:
                statuses[index] = _exit_status(child.returncode)
                level = logging.INFO if child.returncode == 0 else logging.ERROR
                log.log(level, "worker process exited", extra={"pid": child.pid, "hostname": specs[index].node_name,
                                                               "returncode": child.returncode})
                if child.returncode != 0:
                    _stop_the_others(children, statuses, specs[index].node_name)
        if len(statuses) < len(children):
            time.sleep(poll_s)
    failures = [statuses[index] for index in sorted(statuses) if statuses[index] != 0]
    return failures[0] if failures else 0


def _stop_the_others(children: list[subprocess.Popen], statuses: dict[int, int], failed: str) -> None:
    """Warm shutdown for the processes still running (their jobs finish first), so the set restarts as one."""
    running = [child for index, child in enumerate(children) if index not in statuses and child.poll() is None]
    if running:
        log.error("a worker process failed; stopping the others so that the whole set restarts",
                  extra={"hostname": failed, "stopping": len(running)})
    for child in running:
        child.terminate()


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the supervisor dies, even by SIGKILL (Linux), so no worker is left
    holding its GPU and taking jobs when the supervisor is restarted."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _exit_status(returncode: int) -> int:
    """A shell's exit status: a child killed by signal N counts as 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def _stop(children: list[subprocess.Popen]) -> None:
    """Only on the supervisor's own failure: children must not outlive it."""
    for child in children:
        if child.poll() is None:
            child.terminate()
    for child in children:
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()


def supervise(spec: str, argv: list[str], metrics_port: int = 0, log_level: str = "INFO",
              command: list[str] | None = None, device: str = "", log_format: str = "json") -> int:
    """`inpaint-worker --gpus SPEC [celery options]`: plan this host's worker processes (`command`: how to start
    one, default `python -m worker`; `device`: INPAINT_DEVICE) and run them until all have exited."""
    from worker.app import configure_logs  # the workers' log format (Celery does not configure this process)

    configure_logs(log_level, log_format)
    devices = visible_devices() if spec.strip().lower() != "none" else []
    gpus = parse_gpus(spec, len(devices))
    check_device(device, gpus)
    specs = plan_processes(gpus, argv, devices, metrics_port, command)
    log.info("supervising worker processes", extra={"gpus": spec, "processes": [s.node_name for s in specs]})
    return run_processes(specs)

