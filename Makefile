# The two set-up commands of README's quick start; each builds what it needs when missing:
#   make main-job   Python 3.12 venv (.venv) with the extras, bubblewrap when possible, then the CPU main job
#   make test       the same set-up, then the test suite (what .ci/run runs, after `make clean`)
# Variables: OUT (main-job's run folder), PYTEST_ARGS, EXTRAS, VENV, PYTHON312 (an interpreter command that
# overrides tools/find_python312.sh). `make -n test` shows what would run.

VENV ?= .venv
EXTRAS ?= train,eval,test,launch,plot
OUT ?= runs/tiny_cpu
PYTEST_ARGS ?= -q tests
PYTHON312 ?=

comma := ,
PY := $(VENV)/bin/python
# Reinstalls when setup.py or the extras change; a stamp per extras list.
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: main-job test venv bwrap clean

main-job: venv bwrap
	$(PY) -m avsd_megatron main-job --out $(OUT)

test: venv bwrap
	$(PY) -m pytest $(PYTEST_ARGS)

venv: $(STAMP)

$(PY):
	@py="$(PYTHON312)"; [ -n "$$py" ] || py="$$(tools/find_python312.sh)" || exit 1; \
	echo "creating $(VENV) with $$py"; \
	$$py -m venv $(VENV) || { \
	echo "error: '$$py -m venv' failed (Debian/Ubuntu: apt-get install -y python3.12-venv)" >&2; \
	rm -rf $(VENV); exit 1; }

$(STAMP): $(PY) setup.py pyproject.toml
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	@rm -f $(VENV)/.installed-*
	@touch $@

# bubblewrap runs the code sandbox (avsd_megatron/verify/sandbox.py). Without it the sandbox tests skip (they fail
# under CI=true or AVSD_REQUIRE_SANDBOX=1, tests/conftest.py) and code-task training or evaluation stops with the
# same install command; math training and the main job do not need it.
bwrap:
	@if command -v bwrap >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing bubblewrap (apt-get)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap; } \
	  || echo "warning: could not install bubblewrap; the sandbox tests will be skipped" >&2; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  echo "note: bubblewrap is missing (the sandbox tests will be skipped); install it with:" \
	    "sudo apt-get install -y bubblewrap" >&2; \
	else \
	  echo "note: bubblewrap is missing (the sandbox tests will be skipped); install the 'bubblewrap' package" \
	    "(Fedora: sudo dnf install bubblewrap)" >&2; \
	fi

clean:
	rm -rf $(VENV)
