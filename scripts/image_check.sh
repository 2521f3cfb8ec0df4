#!/usr/bin/env bash
# Checks a built worker image (docker/Dockerfile) without a GPU:
#   the non-root uid, no C compiler, the worker imports, Triton's prebuilt driver stub found with CC=/bin/false,
#   and a real job on the CPU (tiny random model) against a private redis-server + moto S3 on this host, the image's
#   HEALTHCHECK turning healthy, and a clean exit on `docker stop` (SIGTERM).
#
#   scripts/image_check.sh [IMAGE]        # default inpaint-fleet-worker:0.1.0
#
# Needs: a Docker engine, the project's venv (`make venv`; or PY=/path/to/python) and `redis-server` on the host.
# Exits non-zero at the first failed check, naming it.
set -euo pipefail

IMAGE=${1:-inpaint-fleet-worker:0.1.0}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
UID_WANTED=${APP_UID:-10001}
WORK=$(mktemp -d /tmp/image-check.XXXXXX)
NAME=inpaint-image-check-$$
STACK_PID=""

fail() { echo "image_check: FAIL: $*" >&2; exit 1; }
ok() { echo "image_check: ok: $*"; }
cleanup() {
  docker rm -f "$NAME" >/dev/null 2>&1 || true
  if [ -n "$STACK_PID" ]; then kill "$STACK_PID" 2>/dev/null || true; wait "$STACK_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
# A command in a throwaway container of the image, as the image's user.
in_image() { docker run --rm --network none --entrypoint "$1" "$IMAGE" "${@:2}"; }

docker image inspect "$IMAGE" >/dev/null 2>&1 || fail "no image $IMAGE (build it: docker build -f docker/Dockerfile -t $IMAGE .)"
[ -x "$PY" ] || fail "no python at $PY (make venv, or set PY)"
command -v redis-server >/dev/null || fail "redis-server is not installed on this host"

# --- the image, statically ------------------------------------------------------------------------------------
user=$(docker image inspect -f '{{.Config.User}}' "$IMAGE")
[[ "$user" =~ ^[0-9]+(:[0-9]+)?$ && "${user%%:*}" != 0 ]] || fail "USER is '$user': want a numeric non-root uid"
uid=$(in_image id -u)
[ "$uid" = "$UID_WANTED" ] || fail "runs as uid $uid, want $UID_WANTED"
ok "runs as uid $uid (USER $user)"

compilers=$(in_image sh -c 'for c in cc gcc clang tcc c99 x86_64-linux-gnu-gcc aarch64-linux-gnu-gcc; do
  command -v "$c" || true; done')
[ -z "$compilers" ] || fail "C compiler(s) in the final stage: $compilers"
ok "no C compiler"

in_image python -c "import worker.gpus, worker.metrics, worker.inference.pipeline" || fail "the worker modules do not import"
ok "worker.gpus, worker.metrics, worker.inference.pipeline import"

[ -n "$(docker image inspect -f '{{if .Config.Healthcheck}}{{.Config.Healthcheck.Test}}{{end}}' "$IMAGE")" ] \
  || fail "the image has no HEALTHCHECK"
in_image sh -c 'touch "$HF_HOME/.w" "$TRITON_CACHE_DIR/.w"' || fail "HF_HOME or TRITON_CACHE_DIR is not writable"

# torch bundles its own CUDA; its major version must be the base's (nvidia/cuda's CUDA_VERSION, from which
# NVIDIA_REQUIRE_CUDA is set), or the container starts on drivers too old for torch and the worker cannot load.
image_env() { docker image inspect -f '{{range .Config.Env}}{{println .}}{{end}}' "$IMAGE" | sed -n "s/^$1=//p"; }
torch_cuda=$(in_image python -c "import torch; print(torch.version.cuda or 'none')")
base_cuda=$(image_env CUDA_VERSION)
[ "${torch_cuda%%.*}" = "${base_cuda%%.*}" ] \
  || fail "torch is built for CUDA $torch_cuda but the base image is CUDA ${base_cuda:-(unset)}: the base admits" \
          "drivers ($(image_env NVIDIA_REQUIRE_CUDA)) that torch cannot use; match CUDA_VERSION and the torch build"
ok "torch CUDA $torch_cuda on a CUDA $base_cuda base"

# --- Triton's driver stub: prebuilt in the build stage, found without a compiler ------------------------------
# What the Dockerfile's own check does: CC=/bin/false, Triton must find cuda_utils in its cache.
in_image env CC=/bin/false python -c "import os; from triton.backends.nvidia import driver
from triton.runtime.build import compile_so_from_file
print(compile_so_from_file(os.path.join(driver.dirname, 'driver.c'), 'cuda_utils', library_dirs=driver.library_dirs(),
      include_dirs=driver.include_dirs, libraries=driver.libraries))" \
  || fail "Triton's driver stub is not in the image's cache: Triton would run a compiler"
# And loading it as at run time, with a stand-in libcuda.so.1 where the NVIDIA toolkit mounts the real one (a stub
# exporting every cu* function driver.c names, built with this host's compiler; skipped without one).
if command -v cc >/dev/null; then
  libcuda_dir=$(image_env TRITON_LIBCUDA_PATH)
  [ -n "$libcuda_dir" ] || fail "the image sets no TRITON_LIBCUDA_PATH"
  in_image python -c "from triton.backends.nvidia import driver; print(open(driver.dirname + '/driver.c').read())" \
    | grep -oE '\bcu[A-Z][A-Za-z0-9_]*\s*\(' | sed -E 's/\s*\($//' | sort -u \
    | sed 's/.*/int &(void) { return 999; }/' > "$WORK/libcuda.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$WORK/libcuda.so.1" "$WORK/libcuda.c"
  chmod 755 "$WORK" && chmod 644 "$WORK/libcuda.so.1"
  docker run --rm --network none -e CC=/bin/false -v "$WORK/libcuda.so.1:$libcuda_dir/libcuda.so.1:ro" \
    --entrypoint python "$IMAGE" -c "from triton.backends.nvidia import driver; driver.CudaUtils()" \
    || fail "Triton's driver stub does not load at run time without a compiler"
  ok "Triton's driver stub is prebuilt and loads with CC=/bin/false"
else
  ok "Triton's driver stub is prebuilt (loading it skipped: no host compiler for a stand-in libcuda)"
fi

# --- a job on the CPU, end to end -----------------------------------------------------------------------------
"$PY" -m worker.inference.model.tiny "$WORK/model" >/dev/null
chmod -R a+rX "$WORK"
# redis-server + moto S3 on 127.0.0.1 (free ports), a bucket; their worker environment goes to stack.env.
(cd "$ROOT" && exec "$PY" -c "
import signal, sys, time
from tests import devstack
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # exit through atexit: devstack stops both servers
redis, s3 = devstack.start_redis(), devstack.start_s3()
devstack.create_bucket(s3.endpoint_url, 'inpaint')
env = devstack.worker_env(redis.url, s3.endpoint_url, 'inpaint', '/model', INPAINT_METRICS_PORT=devstack.free_port())
open('$WORK/stack.env.tmp', 'w').write(''.join(f'{k}={v}\n' for k, v in env.items()))
__import__('os').rename('$WORK/stack.env.tmp', '$WORK/stack.env')
while True: time.sleep(1)
") >"$WORK/stack.log" 2>&1 &
STACK_PID=$!
for _ in $(seq 120); do [ -f "$WORK/stack.env" ] || sleep 0.5; done
[ -f "$WORK/stack.env" ] || fail "redis/moto did not start: $(tail -5 "$WORK/stack.log")"
port=$(sed -n 's/^INPAINT_METRICS_PORT=//p' "$WORK/stack.env")

docker run -d --name "$NAME" --network host --env-file "$WORK/stack.env" \
  -e INPAINT_DEVICE=cpu -e INPAINT_KERNELS=torch -e INPAINT_CUDA_GRAPHS=off \
  -v "$WORK/model:/model:ro" --health-interval 2s --health-start-period 300s "$IMAGE" >/dev/null \
  || fail "docker run failed"
health=""
for _ in $(seq 150); do
  health=$(docker inspect -f '{{.State.Status}} {{.State.Health.Status}}' "$NAME")
  [ "$health" = "running healthy" ] && break
  [ "${health%% *}" = running ] || break
  sleep 2
done
[ "$health" = "running healthy" ] || { docker logs --tail 40 "$NAME" >&2; fail "container is '$health', not healthy"; }
code=$("$PY" -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$port/ready', timeout=5).status)")
[ "$code" = 200 ] || fail "/ready answered $code"
ok "container healthy, /ready 200 (port $port)"

( set -a; . "$WORK/stack.env"; set +a
  cd "$ROOT" && "$PY" -m api_client.cli submit --image examples/image.png --mask examples/mask.png \
    --prompt "a red brick house" --steps 2 --width 64 --height 64 --seed 1 --wait --timeout 300 --out "$WORK/out" ) \
  >"$WORK/submit.log" 2>&1 || { cat "$WORK/submit.log" >&2; docker logs --tail 40 "$NAME" >&2; fail "the job did not succeed"; }
[ -n "$(ls "$WORK/out")" ] || fail "the job succeeded but no image came back"
ok "a CPU job succeeded: $(tail -1 "$WORK/submit.log")"

# --- SIGTERM: Celery's warm shutdown, exit code 0, well within the grace period -------------------------------
start=$SECONDS
docker stop -t 60 "$NAME" >/dev/null
exit_code=$(docker inspect -f '{{.State.ExitCode}}' "$NAME")
[ "$exit_code" = 0 ] || { docker logs --tail 20 "$NAME" >&2; fail "exit code $exit_code after docker stop"; }
ok "docker stop: exit code 0 after $((SECONDS - start)) s"
echo "image_check: all checks passed for $IMAGE"
