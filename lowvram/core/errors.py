"""One error family for everything lowvram refuses or fails at.

Every error carries a one-line message and a hint that tells the user what to do. The CLI catches
`LowvramError` once (lowvram/cli/app.py) and prints both; a traceback appears only with --debug.
"""

from __future__ import annotations


class LowvramError(Exception):
    """A failure the user can act on: a sentence saying what happened, and a hint."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(LowvramError):
    """The command line itself is wrong (exit code 2, as typer's own usage errors)."""

    exit_code = 2


class FactsError(LowvramError):
    """A facts file (`--facts`, LOWVRAM_FACTS) that cannot be read."""


class HardwareProbeError(LowvramError):
    """Probing the machine failed in a way that leaves no useful answer."""


class WebuiError(LowvramError):
    """A path that is not a WebUI, or a WebUI file lowvram cannot read."""


class ProfileError(LowvramError):
    """A profile that does not exist or does not validate."""


class FlagError(LowvramError):
    """A flag the target UI does not have (it would exit 2 after installing packages)."""


class ApplyError(LowvramError):
    """Writing into the WebUI tree failed; nothing was left half-written."""


class ExtensionError(LowvramError):
    """Installing or updating an extension failed."""


class LockError(LowvramError):
    """Another lowvram process holds this WebUI's lock."""


class LaunchError(LowvramError):
    """The UI could not be started."""


class ObservationError(LowvramError):
    """Observations that cannot be recorded."""
