# Two entry points, both self-installing (see README "Quick start"): `make demo` sets up the core
# only, `make test` every extra plus the official Wan source for the parity tests. Set-up is
# skipped (one line) when nothing changed; scripts/setup.sh says how it decides.
PROMPT ?= a red circle moving left
.PHONY: setup setup-all demo test
setup:
	@bash scripts/setup.sh
setup-all:
	@bash scripts/setup.sh all
# A fresh timestamped file each run, so nothing made earlier is overwritten.
demo: setup
	@mkdir -p outputs
	.venv/bin/wanx generate "$(PROMPT)" --save_file outputs/demo_$$(date +%Y%m%d_%H%M%S).mp4
test: setup-all
	.venv/bin/python -m pytest -q
