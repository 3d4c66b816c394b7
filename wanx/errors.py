"""The exceptions a caller of wanx handles: bad input, a cancelled run, a failed generation."""

from __future__ import annotations

from typing import Mapping


class InputError(ValueError):
    """A user argument is invalid; the message names the argument and what is accepted.

    The message is a template in which ``{arg}`` stands for the argument's name, so each front
    end shows the name its user typed: ``image`` from Python, ``--image`` from the CLI.
    """

    def __init__(self, argument: str, template: str):
        self.argument = argument
        self.template = template if "{arg}" in template else "{arg}: " + template
        super().__init__(self.template.replace("{arg}", argument))

    def message_for(self, names: Mapping[str, str]) -> str:
        """The message with the argument shown as ``names[argument]`` (e.g. its CLI flag)."""
        return self.template.replace("{arg}", names.get(self.argument, self.argument))


class Cancelled(Exception):
    """Raised by a generation callback to stop a run between two steps; the run cleans up and re-raises."""


class GenerationError(RuntimeError):
    """A generation ran but produced no usable result (e.g. the sampler produced NaN or inf)."""
