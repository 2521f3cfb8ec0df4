"""Local services for tests, `make demo` and benchmarks: a private redis-server, a moto S3 server, worker processes.

Public names:
- `free_port() -> int`
- `start_redis(port=None, appendonly=False, password=None, timeout=10.0) -> RedisServer` (.url, .port, .stop())
- `start_s3(port=None, timeout=30.0) -> S3Server` (.endpoint_url, .port, .env (fake AWS credentials), .stop())
- `create_bucket(endpoint_url, bucket) -> None`; `FAKE_AWS`: the fake credentials and region moto accepts
- `worker_env(broker_url, s3_endpoint_url, bucket, model, **extra) -> dict` (the INPAINT_* and AWS_* variables)
- `start_worker(env, hostname=None, args=(), log_path=None) -> WorkerProcess` (a Popen with .hostname, .log_path,
  .log_text(), .stop()); `wait_worker_ready(broker_url, worker, timeout=60.0)`
- `start_api(env, port=None, log_path=None, timeout=30.0) -> ApiProcess`: an `inpaint-api` process (a Popen with
  .url, .port, .log_text(), .stop()), returned once /healthz answers
Every process started here is stopped when its handle's .stop() runs, and at interpreter exit at the latest.
Only servers started here are ever touched: each gets a fresh free port and its own data folder.
"""
import atexit
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["free_port", "start_redis", "start_s3", "create_bucket", "worker_env", "start_worker",
           "wait_worker_ready", "start_api", "RedisServer", "S3Server", "WorkerProcess", "ApiProcess", "FAKE_AWS"]

LOCALHOST = "127.0.0.1"
# moto accepts any credentials; these only keep boto3 from searching the machine for real ones.
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
_started: list = []


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return sock.getsockname()[1]


def _stop_process(process: subprocess.Popen, timeout: float = 10.0, sig=signal.SIGTERM) -> None:
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def _stop_all() -> None:
    for handle in reversed(_started):
        handle.stop()


atexit.register(_stop_all)


def _wait_until(ready, process: subprocess.Popen, what: str, timeout: float, log=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} while starting"
                               + (f"; log:\n{log()}" if log else ""))
        if ready():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} was not ready within {timeout}s" + (f"; log:\n{log()}" if log else ""))


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


class _Service:
    def __init__(self, process: subprocess.Popen, folder: Path):
        self.process, self.folder = process, folder
        _started.append(self)

    def stop(self) -> None:
        _stop_process(self.process)
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


class RedisServer(_Service):
    def __init__(self, process, folder, port: int, password: str | None):
        super().__init__(process, folder)
        self.port, self.password = port, password
        auth = f":{password}@" if password else ""
        self.url = f"redis://{auth}{LOCALHOST}:{port}/0"

    def ping(self) -> bool:
        import redis

        try:
            with redis.Redis.from_url(self.url, socket_timeout=1) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False


def start_redis(port: int | None = None, appendonly: bool = False, password: str | None = None,
                timeout: float = 10.0) -> RedisServer:
    """A private redis-server on 127.0.0.1 (a free port unless given), data in its own temporary folder."""
    port = port or free_port()
    folder = Path(tempfile.mkdtemp(prefix="inpaint-redis-"))
    command = ["redis-server", "--port", str(port), "--bind", LOCALHOST, "--dir", str(folder), "--save", "",
               "--appendonly", "yes" if appendonly else "no", "--logfile", str(folder / "redis.log")]
    if password:
        command += ["--requirepass", password]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    server = RedisServer(process, folder, port, password)
    _wait_until(server.ping, process, f"redis-server on port {port}", timeout,
                log=lambda: _tail(folder / "redis.log"))
    return server


class S3Server(_Service):
    def __init__(self, process, folder, port: int):
        super().__init__(process, folder)
        self.port = port
        self.endpoint_url = f"http://{LOCALHOST}:{port}"
        self.env = dict(FAKE_AWS)

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint_url, timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # any HTTP answer means the server is up
        except OSError:
            return False


def start_s3(port: int | None = None, timeout: float = 30.0) -> S3Server:
    """A moto S3 server subprocess over plain HTTP on 127.0.0.1."""
    port = port or free_port()
    folder = Path(tempfile.mkdtemp(prefix="inpaint-s3-"))
    log = folder / "moto.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", LOCALHOST, "-p", str(port)],
                                   stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, **FAKE_AWS})
    server = S3Server(process, folder, port)
    _wait_until(server.answers, process, f"moto S3 server on port {port}", timeout, log=lambda: _tail(log))
    return server


def create_bucket(endpoint_url: str, bucket: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint_url, region_name=FAKE_AWS["AWS_DEFAULT_REGION"],
                          aws_access_key_id=FAKE_AWS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=FAKE_AWS["AWS_SECRET_ACCESS_KEY"])
    client.create_bucket(Bucket=bucket)


def worker_env(broker_url: str, s3_endpoint_url: str, bucket: str, model: str, **extra: str) -> dict:
    """The environment of a local worker: broker, S3 (fake credentials), bucket, model, plus `extra` variables."""
    env = {"INPAINT_BROKER_URL": broker_url, "INPAINT_S3_ENDPOINT_URL": s3_endpoint_url, "INPAINT_BUCKET": bucket,
           "INPAINT_MODEL": str(model), **FAKE_AWS}
    env.update({name: str(value) for name, value in extra.items()})
    return env


class _LoggedProcess(subprocess.Popen):
    """A service process whose log (stdout and stderr) goes to `log_path`."""
    log_path: Path
    stop_timeout: float = 10.0

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM, then killed after `timeout` (default: the class's stop_timeout)."""
        _stop_process(self, self.stop_timeout if timeout is None else timeout)


class WorkerProcess(_LoggedProcess):
    """An `inpaint-worker` process."""
    hostname: str
    stop_timeout = 20.0   # SIGTERM is Celery's warm shutdown: the running job finishes first


def start_worker(env: dict, hostname: str | None = None, args=(), log_path=None) -> WorkerProcess:
    """Start `python -m worker` with os.environ updated by `env`; extra celery worker options in `args`."""
    hostname = hostname or f"inpaint-{secrets.token_hex(4)}@{socket.gethostname()}"
    if log_path is None:
        log_path = Path(tempfile.mkdtemp(prefix="inpaint-worker-")) / "worker.log"
    log_path = Path(log_path)
    with open(log_path, "ab") as log_file:
        process = WorkerProcess([sys.executable, "-m", "worker", "--hostname", hostname, *args],
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **env})
    process.hostname, process.log_path = hostname, log_path
    _started.append(process)
    return process


def wait_worker_ready(broker_url: str, worker: WorkerProcess, timeout: float = 60.0) -> None:
    """Block until the worker answers a Celery ping (it is consuming); raises with its log if it dies or stalls."""
    from celery import Celery

    app = Celery("inpaint-devstack", broker=broker_url, set_as_current=False)
    app.conf.update(accept_content=["json"], task_serializer="json", broker_connection_retry_on_startup=False)
    try:
        _wait_until(lambda: bool(app.control.ping(destination=[worker.hostname], timeout=0.5)), worker,
                    f"worker {worker.hostname}", timeout, log=lambda: worker.log_text()[-4000:])
    finally:
        app.close()


class ApiProcess(_LoggedProcess):
    """An `inpaint-api` process on 127.0.0.1."""
    url: str
    port: int

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=1):
                return True
        except OSError:
            return False


def start_api(env: dict, port: int | None = None, log_path=None, timeout: float = 30.0) -> ApiProcess:
    """Start `python -m api` (the `inpaint-api` command) with os.environ updated by `env`, on a free port."""
    port = port or free_port()
    if log_path is None:
        log_path = Path(tempfile.mkdtemp(prefix="inpaint-api-")) / "api.log"
    log_path = Path(log_path)
    with open(log_path, "ab") as log_file:
        process = ApiProcess([sys.executable, "-m", "api", "--host", LOCALHOST, "--port", str(port)],
                             stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                             env={**os.environ, **env})
    process.port, process.url, process.log_path = port, f"http://{LOCALHOST}:{port}", log_path
    _started.append(process)
    _wait_until(process.answers, process, f"inpaint-api on port {port}", timeout,
                log=lambda: process.log_text()[-4000:])
    return process
