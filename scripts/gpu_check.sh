#!/usr/bin/env bash
# Everything that needs a CUDA GPU, sized for a short loan of a GPU machine: the GPU tests first (kernels against
# float64, CUDA-graph replay against eager), then the kernel and pipeline benchmarks. Each step has its own time
# limit and writes into $OUT as it goes (the benchmark tables row by row), so a run cut short keeps what it did.
#
#   make gpu-wheels                        # here, once: what the GPU image lacks (diffusers), as wheels in .whl/
#   bash scripts/gpu_check.sh tests kernels    # there, from the repo root, .whl/ beside it: about 6 minutes
#   bash scripts/gpu_check.sh pipeline         # there: about 3 minutes (two calls fit a 10-minute limit each)
#   bash scripts/gpu_check.sh pipeline-sdxl    # there: SDXL inpainting, 1024x1024, 30 steps: about 4 minutes
#   GPU_CHECK_SMOKE=1 bash scripts/gpu_check.sh    # on a CPU: the same plumbing, benchmarks in --smoke mode
#
# No step names means all four. $OUT (default out/gpu-check) receives run.log (everything printed, with each
# step's exit status and seconds), junit.xml and the benchmark tables <date>-<device>-kernels.md,
# <date>-<device>-pipeline.md and <date>-<device>-pipeline-sdxl.md, to be committed under benchmarks/results/.
set -uo pipefail

OUT=${OUT:-out/gpu-check}
mkdir -p "$OUT"
LOG="$OUT/run.log"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PYTHON=${PYTHON:-python3}

WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    # --target keeps the image's own packages untouched; what is carried wins on the path.
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl || { echo "gpu_check: installing $WHEELS/ failed" | tee -a "$LOG"; exit 1; }
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

# step NAME SECONDS COMMAND...: run it under a time limit, log its output, record its exit status.
step() {
    local name=$1 limit=$2 started=$SECONDS status
    shift 2
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    status=${PIPESTATUS[0]}
    echo "=== $name: exit $status after $((SECONDS - started))s" | tee -a "$LOG"
    return "$status"
}

step environment 30 "$PYTHON" -c '
import os, shutil, torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)")
print("nvidia-smi", shutil.which("nvidia-smi"), "/dev/nvidiactl", os.path.exists("/dev/nvidiactl"),
      "TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET"))'
device=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name().split()[-1].lower()
                                            if torch.cuda.is_available() else "cpu")')
prefix="$OUT/$(date -u +%F)-$device"

kernel_args=() pipeline_args=(--no-compile)
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
    export TRITON_INTERPRET=1
    kernel_args=(--smoke)
    pipeline_args+=(--smoke --kernels torch)  # interpreted Triton takes minutes a pipeline run
fi

steps=${*:-tests kernels pipeline pipeline-sdxl}
wanted() { [[ " $steps " == *" $1 "* ]]; }

# Most of the tests' time is Triton compiling and autotuning on the CPU: spread it over processes when pytest-xdist
# is there (the GPU image has it). Autotuning in parallel picks noisier tiles, which the tests don't time.
parallel=()
"$PYTHON" -c 'import xdist' 2>/dev/null && parallel=(-n 6)

failed=0
if wanted tests; then
    step tests 240 "$PYTHON" -m pytest -q "${parallel[@]}" -p no:cacheprovider --timeout 120 \
        --junitxml "$OUT/junit.xml" \
        tests/test_kernels.py tests/test_denoise_gpu.py tests/test_model_components.py tests/test_schedulers.py \
        tests/test_metrics.py || failed=1
fi
if wanted kernels; then
    step kernels 130 "$PYTHON" -m benchmarks.kernels "${kernel_args[@]}" --out "$prefix-kernels.md" || failed=1
fi
if wanted pipeline; then
    step pipeline 190 "$PYTHON" -m benchmarks.pipeline_gpu "${pipeline_args[@]}" --out "$prefix-pipeline.md" \
        || failed=1
fi
if wanted pipeline-sdxl; then
    # Triton kernels only (graphs on and off, then diffusers): the SDXL rows must fit one call with the others.
    step pipeline-sdxl 300 "$PYTHON" -m benchmarks.pipeline_gpu --family sdxl --kernels triton "${pipeline_args[@]}" \
        --out "$prefix-pipeline-sdxl.md" || failed=1
fi
echo "=== gpu_check: $([ $failed = 0 ] && echo all steps passed || echo some steps FAILED)" | tee -a "$LOG"
exit $failed
