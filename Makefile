# Two entry points, both self-installing (see README "Quick start").
PROMPT ?= a red circle moving left
.PHONY: setup demo test
setup:
	bash scripts/setup.sh
demo: setup
	.venv/bin/wanx generate --prompt "$(PROMPT)" --save_file outputs/demo.mp4
test: setup
	.venv/bin/python -m pytest -q
