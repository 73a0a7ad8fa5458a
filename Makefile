# One-command setup on a fresh machine: `make test`, `make demo`.
# This machine (and CI) is CPU-only: torch's CPU build is installed first, so nothing pulls a
# multi-GB CUDA build. On a GPU machine: make TORCH_SPEC="torch" EXTRAS="dev,gpu" test
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	# flash-attn (the gpu extra) is a source build that imports torch: it must see the torch
	# installed above, so that extra installs without build isolation.
	case ",$(EXTRAS)," in \
	  *,gpu,*) $(PY) -m pip install -q setuptools wheel packaging ninja psutil && \
	           $(PY) -m pip install -e ".[$(EXTRAS)]" --no-build-isolation ;; \
	  *) $(PY) -m pip install -q -e ".[$(EXTRAS)]" ;; \
	esac
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# The edit-test loop: everything not marked slow (no Ray Train run, no end-to-end job).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	$(PY) -m jobs.demo

clean:
	rm -rf $(VENV) demo_out .cache
