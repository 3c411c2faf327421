"""The installed k2l-dist's version, from the package metadata (pyproject.toml's ``version``)."""

from __future__ import annotations

from importlib import metadata


def package_version() -> str:
    """``"0.1.0"``; ``"0+unknown"`` when the package runs from a folder pip never installed."""
    try:
        return metadata.version("k2l-dist")
    except metadata.PackageNotFoundError:
        return "0+unknown"
