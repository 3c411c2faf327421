"""Fixtures the test modules share, built once per session: the tiny config and its shards."""

from pathlib import Path

import pytest

from k2l_dist.config import Config, load_config
from k2l_dist.prepare import prepare
from tests.tiny import TINY


@pytest.fixture(scope="session")
def tiny_config() -> Config:
    """The tiny training config (tests/tiny.py), resolved."""
    return load_config(None, TINY)


@pytest.fixture(scope="session")
def shards(tmp_path_factory, tiny_config) -> Path:
    """The tiny config's shards, prepared once; tests that change shards prepare their own."""
    out = tmp_path_factory.mktemp("tiny") / "shards"
    prepare(tiny_config, out)
    return out
