"""The errors a user can fix. Each message names the file, key or value at fault and what is valid.

The entry point turns any of these into one line on stderr and exit status 2, before anything is
written to the tracking store.
"""

from __future__ import annotations


class KleinSweepError(Exception):
    """Base class: a problem with the user's input, not a bug."""


class ConfigError(KleinSweepError):
    """A config value is missing, out of range or inconsistent with another."""

    def __init__(self, key: str, value: object, valid: str):
        self.key, self.value, self.valid = key, value, valid
        super().__init__(f"config key '{key}' = {value!r} is invalid: {valid}")


class DataError(KleinSweepError):
    """The training data folder or one of its files cannot be used."""


class ModelError(KleinSweepError):
    """A model or LoRA cannot be loaded (missing weights, mismatched layers)."""
