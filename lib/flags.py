"""
Flags from dataclasses: each config field carries its --help text and its --help section, so a config and
its command line are one list, and argparse errors that fit on one line.

    config_field(default, help, group)   a dataclass field with its --help text and section
    Parser                               argparse whose usage error is one line (the flag and what is allowed)

The configs are the concept files' own (backbones.BackboneConfig, model.DRMoEConfig, ...); config.py
turns them into flags, one --flag per field.
"""
import argparse
from dataclasses import field


def config_field(default, help: str, group: str = "model"):
    """A dataclass field that carries its --help text and --help section, so the flags and the config are one list."""
    return field(default=default, metadata={"help": help, "group": group})


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the flag and what is allowed), not the 60-flag usage block."""

    def error(self, message):
        # Exit status 2, as argparse's own error(): scripts can tell a usage error from a crash.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
