"""Placeholder: commands registered here by the language work."""

from flowspec.cli.app import app  # noqa: F401
