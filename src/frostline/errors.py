"""The exceptions frostline raises. The CLI turns each into one message and a non-zero exit."""

from __future__ import annotations


class FrostlineError(Exception):
    """Base class of every error frostline raises on purpose."""


class ConfigError(FrostlineError, ValueError):
    """A configuration or argument is invalid; the message lists every problem found."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class ModelRefError(FrostlineError, ValueError):
    """A model reference could not be resolved to a model."""


class FreezeSpecError(FrostlineError, ValueError):
    """A freeze spec is malformed or matches nothing in the model; the model is left unchanged."""


class SetupError(FrostlineError):
    """`check_setup` found errors in a model/optimizer set-up; `.findings` holds all findings."""

    def __init__(self, message: str, findings: list):
        self.findings = findings
        super().__init__(message)


class FrozenWeightsChanged(FrostlineError):
    """A tensor that was frozen when `FreezeGuard` fingerprinted it has changed; `.changed` names them."""

    def __init__(self, message: str, changed: list[str]):
        self.changed = changed
        super().__init__(message)
