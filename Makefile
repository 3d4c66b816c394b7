# Two entry points, both self-installing (see README "Quick start").
PROMPT ?= a red circle moving left
.PHONY: setup demo test
setup:
	bash scripts/setup.sh
# A fresh timestamped file each run, so nothing made earlier is overwritten.
demo: setup
	mkdir -p outputs
	.venv/bin/wanx generate "$(PROMPT)" --save_file outputs/demo_$$(date +%Y%m%d_%H%M%S).mp4
test: setup
	.venv/bin/python -m pytest -q
