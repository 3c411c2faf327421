"""How a child process ended, in words."""

from __future__ import annotations

import signal


def exit_description(code: int) -> str:
    """``"exited with code 1"`` or ``"killed by signal SIGKILL"`` (a negative Popen return code)."""
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"
