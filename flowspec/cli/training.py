"""Placeholder: commands registered here by the training work."""

from flowspec.cli.app import app  # noqa: F401
