"""User-facing errors: one clear sentence that names the fix.

Anything a user can cause (bad config, missing data, bad checkpoint) raises a
``FedSSLError``; the CLI prints its message on one line and exits non-zero.
"""

from __future__ import annotations


class FedSSLError(Exception):
    """An error caused by user input; its message says how to fix it."""


class ConfigError(FedSSLError):
    """An unknown key, a wrong type or a value out of range in a config."""


class DataError(FedSSLError):
    """A dataset that is missing, unreadable or holds the wrong files."""


class CheckpointError(FedSSLError):
    """A checkpoint that is corrupt or belongs to another config."""


class DivergedError(FedSSLError):
    """Training produced a non-finite loss."""
