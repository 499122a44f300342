# Set-up is folded into both targets, so on a fresh machine `make demo` or `make test` is all it takes.
# TORCH pins the CPU build of torch (an unpinned torch makes pip download a multi-GB CUDA build).
# On a GPU machine with a CUDA torch already installed: make TORCH= test
PYTHON ?= python3
TORCH ?= torch==2.13.0
PIP_INSTALL = $(PYTHON) -m pip install --disable-pip-version-check -q

.PHONY: install demo test browser
install: .install-stamp

# The serve page's browser test drives Debian's chromium through chromium-driver (selenium is in the
# test extra). Installed with apt-get where that works (root); elsewhere the test skips and says why.
browser:
	@if command -v chromedriver >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian's chromium + chromium-driver (the serve page's browser test)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null; \
	else echo "note: no chromedriver and no root apt-get: the serve page's browser test will be skipped"; fi

.install-stamp: pyproject.toml setup.py
	$(PIP_INSTALL) $(TORCH) -e ".[test]"
	@touch $@

demo: .install-stamp
	council-fast demo

# pytest exits 5 when it collected no test: say so rather than fail silently.
test: .install-stamp browser
	@TRITON_INTERPRET=1 $(PYTHON) -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure here"; fi; exit $$rc
