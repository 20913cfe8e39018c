"""Placeholder: commands registered here by the inspecting work."""

from flowspec.cli.app import app  # noqa: F401
