# The two commands a newcomer runs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test browser bench gpu-wheels image image-check venv clean

venv: $(STAMP)

# torch first, pinned: that version is the CPU build that lies on this disk; a range would pull a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$${TORCH_VERSION:-2.13.0}"
	$(PY) -m pip install -q -e ".[worker,dev]"
	touch $(STAMP)

test: $(STAMP) browser
	$(PY) -m pytest -q

# The page tests drive Debian's chromium through Playwright (never `playwright install`); installed with apt when
# missing, as root or through sudo. Without a browser the page tests fail, they never skip.
CHROMIUM ?= $(or $(INPAINT_CHROMIUM),chromium)
browser:
	@command -v $(CHROMIUM) >/dev/null || { \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$sudo apt-get update -q && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

demo: $(STAMP)
	$(PY) scripts/demo.py

bench: $(STAMP)
	$(PY) -m benchmarks.pipeline_cpu
	$(PY) -m benchmarks.queue
	$(PY) -m benchmarks.api

# The packages scripts/gpu_check.sh needs that the GPU machine's image lacks, as wheels for its Python (3.12):
# only the diffusers oracle, at the version the tests here use.
gpu-wheels: $(STAMP)
	rm -rf .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl \
		"diffusers==$$($(PY) -c 'import diffusers; print(diffusers.__version__)')"

# The worker image, and its checks without a GPU (docs/deploying.md section 2); both need a Docker engine.
IMAGE ?= inpaint-fleet-worker:0.1.0
image:
	docker build -f docker/Dockerfile -t $(IMAGE) .

image-check: $(STAMP)
	bash scripts/image_check.sh $(IMAGE)

clean:
	rm -rf $(VENV) out .pytest_cache
