"""The command-line layer: parses, calls one module per command, renders. Nothing else prints."""

from lowvram.cli.app import app, main

__all__ = ["app", "main"]
