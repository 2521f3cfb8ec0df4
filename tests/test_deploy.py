"""docker/: the Dockerfile, compose file and Kubernetes manifests parse and agree with the code.

No Docker engine or cluster here: the files are read and cross-checked (images, ports, settings variables,
Redis queue keys, shutdown grace against the time limit).
"""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from importlib.metadata import entry_points
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from kombu.transport.redis import Channel

from api.settings import ApiSettings
from api_client import schema
from worker import gpus
from worker.app import create_app
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
WORKER_IMAGE = "inpaint-fleet-worker"
API_IMAGE = "inpaint-fleet-api"
# Upstream images the deployment uses, by name; each must carry an explicit tag.
UPSTREAM_IMAGES = {"redis", "quay.io/minio/minio", "quay.io/minio/mc", "mher/flower"}
# Variables the code reads: the settings, the ones worker.gpus and worker.metrics read before settings has them,
# boto3's and the Hub's.
KNOWN_VARIABLES = ({f.metadata["variable"] for f in fields(Settings)} | {gpus.GPUS_ENV, gpus.METRICS_PORT_ENV}
                   | {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "HF_TOKEN", "HF_HOME"})
COMPILER_PACKAGES = re.compile(r"\b(gcc|g\+\+|clang|build-essential|cpp|make|cmake|[\w.+-]+-dev)\b")
SIZE_UNITS = {"s": 1, "m": 60, "h": 3600}


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yml").read_text())


def manifests() -> list[dict]:
    return [doc for path in sorted((DOCKER / "k8s").glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifest(kind: str, name: str | None = None) -> dict:
    found = [doc for doc in manifests() if doc["kind"] == kind and name in (None, doc["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def interpolate(value: str) -> str:
    """Compose's `${NAME:-default}` with the default taken, and `$$` as a literal `$`."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value).replace("$$", "$")


def worker_services(spec: dict) -> dict:
    return {name: service for name, service in spec["services"].items()
            if service.get("image", "").startswith(WORKER_IMAGE + ":") and "environment" in service}


def container(deployment: dict) -> dict:
    (worker,) = deployment["spec"]["template"]["spec"]["containers"]
    return worker


def duration_s(text: str) -> int:
    return sum(int(amount) * SIZE_UNITS[unit] for amount, unit in re.findall(r"(\d+)([smh])", text))


# ---------------------------------------------------------------- Dockerfile

def dockerfile_stages() -> list[dict]:
    """[{"from": image with ARG defaults filled in, "name": ..., "lines": [instruction, ...]}] of docker/Dockerfile;
    continuation lines are joined and heredoc bodies kept with their RUN."""
    text = (DOCKER / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S*)", text, flags=re.M))
    stages, instruction, heredoc = [], "", None
    for line in text.splitlines():
        if heredoc is None and (not line.strip() or line.lstrip().startswith("#")) and not instruction:
            continue
        instruction += line + "\n"
        if heredoc is not None:
            heredoc = None if line.strip() == heredoc else heredoc
            if heredoc is not None:
                continue
        elif (opened := re.search(r"<<-?'?(\w+)'?\s*$", line)) and line.startswith("RUN"):
            heredoc = opened.group(1)
            continue
        if line.endswith("\\") or heredoc is not None:
            continue
        if instruction.startswith("FROM "):
            image, _, name = instruction.split()[1:4] + [""] * (3 - len(instruction.split()[1:4]))
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
            stages.append({"from": image, "name": name, "lines": []})
        elif stages:
            stages[-1]["lines"].append(instruction.strip())
        instruction = ""
    return stages


def final_stage() -> dict:
    return dockerfile_stages()[-1]


def instructions(stage: dict, keyword: str) -> list[str]:
    return [line[len(keyword) + 1:] for line in stage["lines"] if line.startswith(keyword + " ")]


def test_final_stage_is_a_cuda_base_image_without_compilers():
    # The base flavour: the CUDA runtime and NVIDIA_REQUIRE_CUDA, without the GBs of math libraries the runtime
    # flavour adds, which torch's own CUDA wheels make unused.
    stage = final_stage()
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+(\.\d+)?-base-ubuntu\d+\.\d+", stage["from"]), stage["from"]
    assert stage["from"].replace("-base-", "-devel-") == dockerfile_stages()[0]["from"]  # one CUDA, one Ubuntu
    installs = [line for line in instructions(stage, "RUN") if "apt-get install" in line]
    assert installs, "the final stage installs Python"
    for line in installs:
        assert not COMPILER_PACKAGES.search(line.split("apt-get install", 1)[1]), line
    copied_from = {re.search(r"--from=(\S+)", line).group(1) for line in instructions(stage, "COPY")}
    assert copied_from <= {s["name"] for s in dockerfile_stages()[:-1]}
    # The build stage does hold the compiler (for Triton's driver stub), which is why the stages are split.
    assert any(COMPILER_PACKAGES.search(line) for line in instructions(dockerfile_stages()[0], "RUN"))


def test_final_stage_runs_as_a_numeric_non_root_user():
    stage = final_stage()
    (user,) = instructions(stage, "USER")
    args = dict(re.findall(r"(\w+)=(\S+)", " ".join(instructions(stage, "ARG"))))
    uid = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], user).split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert manifest("Deployment", "inpaint-worker")["spec"]["template"]["spec"]["securityContext"]["runAsUser"] \
        == int(uid)


def test_entrypoint_healthcheck_and_volumes():
    stage = final_stage()
    (entrypoint,) = instructions(stage, "ENTRYPOINT")
    assert entrypoint == '["inpaint-worker"]'
    (script,) = entry_points(group="console_scripts", name="inpaint-worker")
    assert script.value == "worker.__main__:main"
    (healthcheck,) = instructions(stage, "HEALTHCHECK")
    assert "/ready" in healthcheck and "INPAINT_METRICS_PORT" in healthcheck
    env = " ".join(instructions(stage, "ENV"))
    assert "HF_HOME=/data/hf" in env and '"/data/hf"' in " ".join(instructions(stage, "VOLUME"))
    assert f"{gpus.METRICS_PORT_ENV}=9400" in env and instructions(stage, "EXPOSE") == ["9400"]
    for name in re.findall(r"\b(INPAINT_\w+)=", env):
        assert name in KNOWN_VARIABLES, name


def test_project_is_installed_with_the_worker_extra_and_model_can_be_baked():
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r'pip install "/src\[worker\]"', text)
    assert re.search(r"^ARG BAKE_MODEL=", text, flags=re.M)
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, flags=re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"COPY {path}: not in the repository"
            assert f"!{path}" in (DOCKER / "Dockerfile.dockerignore").read_text() or \
                f"!{path}/" in (DOCKER / "Dockerfile.dockerignore").read_text()



def _libcuda_stand_in(folder: Path, driver_source: Path) -> Path:
    """A stand-in for CUDA's stub libcuda.so.1: every cu* function Triton's driver stub names, doing nothing."""
    names = sorted(set(re.findall(r"\b(cu[A-Z]\w*)\s*\(", driver_source.read_text())))
    source = folder / "libcuda_stand_in.c"
    source.write_text("".join(f"int {name}(void) {{ return 999; }}\n" for name in names))
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(folder / "libcuda.so.1"), str(source)], check=True)
    return folder


@pytest.mark.skipif(shutil.which("gcc") is None or importlib.util.find_spec("triton.backends.nvidia") is None,
                    reason="needs gcc and triton's NVIDIA backend")
def test_triton_driver_stub_built_in_the_build_stage_loads_without_a_compiler(tmp_path):
    """The build stage's prebuild (run here as written in the Dockerfile) must leave Triton's cache holding the
    exact module Triton loads at run time: the final stage has no compiler, and CC=/bin/false proves none runs."""
    from triton.backends.nvidia import driver

    (prebuild,) = re.findall(r"^python - <<PY\n(.*?)^PY$", dockerfile_stages()[0]["lines"][-1], flags=re.M | re.S)
    libcuda = _libcuda_stand_in(tmp_path, Path(driver.dirname) / "driver.c")
    env = {**os.environ, "TRITON_LIBCUDA_PATH": str(libcuda), "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    built = subprocess.run([sys.executable, "-c", prebuild], env=env, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]

    env.update(CC="/bin/false", LD_LIBRARY_PATH=str(libcuda))  # the final stage: no compiler, a libcuda.so.1
    loaded = subprocess.run([sys.executable, "-c", "from triton.backends.nvidia import driver; driver.CudaUtils()"],
                            env=env, capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr[-2000:]

# ---------------------------------------------------------------- compose

def test_compose_images_are_ours_or_tagged_upstream_images():
    spec = compose()
    for name, service in spec["services"].items():
        image = interpolate(service["image"])
        repository, _, tag = image.rpartition(":")
        assert tag and (repository in (WORKER_IMAGE, API_IMAGE) or repository in UPSTREAM_IMAGES), f"{name}: {image}"
        # MinIO's community images exist only as the last tags published on quay.io: `latest` will never move.
        assert not (repository.startswith("quay.io/minio/") and tag == "latest"), f"{name}: pin {image}"
        if "build" in service:
            assert (ROOT / "docker" / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        elif repository == WORKER_IMAGE:  # built by another service; on no registry, so never pulled
            assert service.get("pull_policy") == "never", f"{name}: pull_policy"


def test_compose_publishes_on_loopback_with_movable_host_ports():
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            address, rest = port.split(":", 1)
            host = rest.rsplit(":", 1)[0]
            assert address == "127.0.0.1", f"{name}: {port} is reachable from other hosts"
            assert re.fullmatch(r"\$\{\w+_HOST_PORT:-\d+\}", host), f"{name}: host port of {port} cannot be moved"


def test_compose_names_the_worker_image_volume_so_restarts_leave_no_anonymous_ones():
    (path,) = re.findall(r'^VOLUME \["([^"]+)"\]', (DOCKER / "Dockerfile").read_text(), flags=re.M)
    for name, service in compose()["services"].items():
        if interpolate(service["image"]).startswith(WORKER_IMAGE + ":"):
            mounted = {volume.split(":")[1] for volume in service["volumes"]}
            assert path in mounted, f"{name}: nothing named mounted at the image's VOLUME {path}"


def test_compose_workers_reference_known_variables_and_reachable_services():
    spec = compose()
    workers = worker_services(spec)
    assert {"worker-gpu0", "worker-gpu1", "worker-cpu"} <= set(workers)
    redis_password = interpolate(spec["services"]["redis"]["environment"]["REDIS_PASSWORD"])
    for name, service in workers.items():
        env = {key: interpolate(value) if isinstance(value, str) else value
               for key, value in service["environment"].items()}
        for key in env:
            assert key in KNOWN_VARIABLES, f"{name}: {key} is read by nothing"
        Settings.from_env({key: value for key, value in env.items() if isinstance(value, str)})
        broker = urlparse(env["INPAINT_BROKER_URL"])
        assert broker.hostname == "redis" and broker.port == 6379 and broker.password == redis_password
        s3 = urlparse(env["INPAINT_S3_ENDPOINT_URL"])
        assert s3.hostname in spec["services"] and s3.port == 9000
        assert env["AWS_SECRET_ACCESS_KEY"] == interpolate(spec["services"]["minio"]["environment"]
                                                           ["MINIO_ROOT_PASSWORD"])
        published = [port.rsplit(":", 1)[1] for port in service["ports"]]
        assert published == [env["INPAINT_METRICS_PORT"]], f"{name}: metrics port"
        assert duration_s(service["stop_grace_period"]) > Settings.from_env({}).time_limit_s


def test_compose_one_gpu_per_worker():
    devices = {}
    for name, service in worker_services(compose()).items():
        if name.startswith("worker-gpu"):
            (device,) = service["deploy"]["resources"]["reservations"]["devices"]
            assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
            devices[name] = device["device_ids"]
    assert devices == {"worker-gpu0": ["0"], "worker-gpu1": ["1"]}


def default_job_shape() -> dict:
    """INPAINT_WARMUP's form of the job a client sends with no options, at 512x512."""
    steps = schema.Job.__dataclass_fields__["num_inference_steps"].default
    return {"width": 512, "height": 512, "num_inference_steps": steps}


def test_gpu_workers_warm_up_the_default_job_before_taking_jobs():
    workers = worker_services(compose())
    for name, service in workers.items():
        warmup = interpolate(service["environment"]["INPAINT_WARMUP"])
        shapes = Settings.from_env({"INPAINT_WARMUP": warmup}).warmup_shapes
        assert shapes == ([] if name == "worker-cpu" else [default_job_shape()]), name
    configured = manifest("ConfigMap", "inpaint-worker")["data"]["INPAINT_WARMUP"]
    assert Settings.from_env({"INPAINT_WARMUP": configured}).warmup_shapes == [default_job_shape()]


def test_compose_redis_is_durable_password_protected_and_never_evicts():
    spec = compose()
    redis = spec["services"]["redis"]
    assert "--requirepass" in " ".join(redis["command"])
    # Through the image's entrypoint, which drops root for the redis user; a bare redis-server would run as root.
    assert "exec docker-entrypoint.sh redis-server " in " ".join(redis["command"])
    config = dict(line.split(None, 1) for line in (DOCKER / "redis.conf").read_text().splitlines()
                  if line.strip() and not line.startswith("#"))
    assert config["appendonly"] == "yes" and config["maxmemory-policy"] == "noeviction"
    assert "./redis.conf:/usr/local/etc/redis/redis.conf:ro" in redis["volumes"]
    init = spec["services"]["minio-init"]
    assert "mc mb" in " ".join(init["entrypoint"]) and init["environment"]["INPAINT_BUCKET"] == \
        worker_services(spec)["worker-gpu0"]["environment"]["INPAINT_BUCKET"]
    flower = spec["services"]["flower"]
    assert interpolate(flower["environment"]["CELERY_BROKER_URL"]) == \
        interpolate(worker_services(spec)["worker-gpu0"]["environment"]["INPAINT_BROKER_URL"])


def test_compose_api_reads_its_settings_and_shares_the_workers_redis_and_bucket():
    spec = compose()
    api = spec["services"]["api"]
    assert api["build"]["dockerfile"] == "docker/Dockerfile.api" and "profiles" not in api   # in every profile
    env = {key: interpolate(value) for key, value in api["environment"].items()}
    settings = ApiSettings.from_env(env)
    worker = {key: interpolate(value) for key, value in worker_services(spec)["worker-gpu0"]["environment"].items()
              if isinstance(value, str)}
    for name in ("INPAINT_BROKER_URL", "INPAINT_QUEUE", "INPAINT_S3_ENDPOINT_URL", "INPAINT_BUCKET",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[name] == worker[name], name
    (port,) = api["ports"]
    assert port.rsplit(":", 1)[1] == str(settings.port) and settings.host == "0.0.0.0"
    assert "/readyz" in " ".join(api["healthcheck"]["test"])
    dockerfile = (DOCKER / "Dockerfile.api").read_text()
    assert 'ENTRYPOINT ["inpaint-api"]' in dockerfile and "inpaint-api" in {e.name for e in entry_points(
        group="console_scripts")}
    assert "torch" not in dockerfile and re.search(r'pip install "\.\[api\]"', dockerfile)


# ---------------------------------------------------------------- Kubernetes

def test_manifests_parse_and_reference_existing_objects():
    docs = manifests()
    assert {doc["kind"] for doc in docs} >= {"Deployment", "StatefulSet", "Service", "ConfigMap", "Secret",
                                              "ScaledObject", "TriggerAuthentication"}
    config = manifest("ConfigMap", "inpaint-worker")
    secret = manifest("Secret", "inpaint-secrets")
    worker = container(manifest("Deployment", "inpaint-worker"))
    refs = {(kind, ref[kind]["name"]) for ref in worker["envFrom"] for kind in ref}
    assert refs == {("configMapRef", "inpaint-worker"), ("secretRef", "inpaint-secrets")}
    variables = set(config["data"]) | set(secret["stringData"]) | {item["name"] for item in worker["env"]}
    for name in variables - {"REDIS_PASSWORD"}:
        assert name in KNOWN_VARIABLES, f"{name} is read by nothing"
    Settings.from_env({**config["data"], **{k: v for k, v in secret["stringData"].items()
                                           if k.startswith("INPAINT_")}})
    for doc in docs:
        for reference in re.findall(r"'secretKeyRef': \{'name': '([^']+)', 'key': '([^']+)'", str(doc)):
            assert reference[0] == "inpaint-secrets" and reference[1] in secret["stringData"], reference
    broker = urlparse(secret["stringData"]["INPAINT_BROKER_URL"])
    redis_service = manifest("Service", "inpaint-redis")
    assert broker.hostname == redis_service["metadata"]["name"]
    assert broker.port == redis_service["spec"]["ports"][0]["port"]
    assert worker["image"].rpartition(":")[0] == WORKER_IMAGE


def test_worker_deployment_gpu_probes_metrics_and_grace():
    deployment = manifest("Deployment", "inpaint-worker")
    pod = deployment["spec"]["template"]
    worker = container(deployment)
    config = manifest("ConfigMap", "inpaint-worker")["data"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    (port,) = worker["ports"]
    assert port["containerPort"] == int(config["INPAINT_METRICS_PORT"])
    assert worker["readinessProbe"]["httpGet"] == {"path": "/ready", "port": port["name"]}
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == port["containerPort"]
    # SIGTERM waits for the running job: the pod must be given more than the job's hard time limit.
    time_limit_s = Settings.from_env(config).time_limit_s
    assert pod["spec"]["terminationGracePeriodSeconds"] > time_limit_s
    assert {item["name"]: item["value"] for item in worker["env"]}[gpus.GPUS_ENV] == ""


def test_api_deployment_probes_service_and_autoscaling():
    deployment = manifest("Deployment", "inpaint-api")
    api = container(deployment)
    assert api["image"].rpartition(":")[0] == API_IMAGE
    env = {item["name"]: item["value"] for item in api["env"]}
    config, secret = manifest("ConfigMap", "inpaint-worker")["data"], manifest("Secret", "inpaint-secrets")
    settings = ApiSettings.from_env({**config, **secret["stringData"], **env})
    (port,) = api["ports"]
    assert port["containerPort"] == settings.port and settings.host == "0.0.0.0"
    assert api["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    assert api["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    refs = {ref[kind]["name"] for ref in api["envFrom"] for kind in ref}
    assert refs == {"inpaint-worker", "inpaint-secrets"}
    service = manifest("Service", "inpaint-api")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    hpa = manifest("HorizontalPodAutoscaler", "inpaint-api")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "inpaint-api" and hpa["spec"]["minReplicas"] >= 2
    # Longer than the longest held request, so a rollout ends `Prefer: wait` answers instead of cutting them.
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > settings.max_wait_s


def test_redis_statefulset_is_durable_and_never_evicts():
    redis = manifest("StatefulSet", "inpaint-redis")
    (server,) = redis["spec"]["template"]["spec"]["containers"]
    args = dict(zip(server["args"][1::2], server["args"][2::2]))
    assert args["--appendonly"] == "yes" and args["--maxmemory-policy"] == "noeviction"
    assert args["--requirepass"] == "$(REDIS_PASSWORD)"
    assert "REDIS_PASSWORD" in {item["name"] for item in server["env"]}
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    mounts = {mount["name"]: mount["mountPath"] for mount in server["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == args["--dir"]


def celery_queue_keys(queue: str) -> list[str]:
    """The Redis lists Celery's Redis transport fills for `queue`, one per priority band (kombu's _q_for_pri)."""
    options = create_app(Settings()).conf.broker_transport_options or {}
    steps, sep = options.get("priority_steps", Channel.priority_steps), options.get("sep", Channel.sep)
    return [f"{queue}{sep}{step}" if step else queue for step in steps]


def test_keda_watches_every_priority_list_of_the_configured_queue():
    scaled = manifest("ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == manifest("Deployment", "inpaint-worker")["metadata"]["name"]
    queue = manifest("ConfigMap", "inpaint-worker")["data"]["INPAINT_QUEUE"]
    triggers = scaled["spec"]["triggers"]
    assert sorted(t["metadata"]["listName"] for t in triggers) == sorted(celery_queue_keys(queue))
    assert "inpaint\x06\x163" in celery_queue_keys("inpaint")  # the job schema's default priority, 5
    formula = scaled["spec"]["advanced"]["scalingModifiers"]["formula"]
    assert sorted(re.findall(r"\w+", formula)) == sorted(t["name"] for t in triggers)
    auth = manifest("TriggerAuthentication", "inpaint-redis")
    (secret_ref,) = auth["spec"]["secretTargetRef"]
    assert secret_ref["key"] in manifest("Secret", "inpaint-secrets")["stringData"]
    redis_service = manifest("Service", "inpaint-redis")
    for trigger in triggers:
        assert trigger["type"] == "redis" and trigger["authenticationRef"]["name"] == "inpaint-redis"
        host, port = trigger["metadata"]["address"].rsplit(":", 1)
        assert host.split(".")[0] == redis_service["metadata"]["name"]
        assert int(port) == redis_service["spec"]["ports"][0]["port"]


@pytest.mark.parametrize("path", ["docker/Dockerfile", "docker/Dockerfile.api", "docker/compose.yml",
                                  "docs/deploying.md", "docker/k8s/api.yaml"])
def test_deployment_files_hold_no_real_looking_secrets(path):
    text = (ROOT / path).read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    assert not re.search(r"hf_[A-Za-z0-9]{30,}", text)
