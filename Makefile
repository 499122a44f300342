# Set-up is folded into both targets, so on a fresh machine `make demo` or `make test` is all it takes.
# TORCH pins the CPU build of torch (an unpinned torch makes pip download a multi-GB CUDA build).
# On a GPU machine with a CUDA torch already installed: make TORCH= test
PYTHON ?= python3
TORCH ?= torch==2.13.0
PIP_INSTALL = $(PYTHON) -m pip install --disable-pip-version-check -q

.PHONY: install demo test
install: .install-stamp

.install-stamp: pyproject.toml setup.py
	$(PIP_INSTALL) $(TORCH) -e ".[test]"
	@touch $@

demo: .install-stamp
	council-fast demo

# pytest exits 5 when it collected no test: say so rather than fail silently.
test: .install-stamp
	@TRITON_INTERPRET=1 $(PYTHON) -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure here"; fi; exit $$rc
