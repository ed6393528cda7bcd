"""Errors the converter raises on purpose: their message is what the user reads."""

from __future__ import annotations


class ConversionError(Exception):
    """A conversion that cannot go on; the message says what was found and what to do."""


class InputError(ConversionError):
    """The input is not a checkpoint this converter accepts."""
