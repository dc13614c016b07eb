"""Fixtures of the stand-in's tests: `pub` (one publisher with a fresh repository) and `pair` (two publishers
sharing one gateway folder). Helpers live in harness.py."""

import os
import py_compile
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import Publisher, make_keys, standin  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def compiled_standin():
    """Each command is a new interpreter: with PYTHONDONTWRITEBYTECODE set it would compile the stand-in every
    time."""
    for name in sorted(os.listdir(os.path.dirname(standin.__file__))):
        if name.endswith(".py"):
            py_compile.compile(os.path.join(os.path.dirname(standin.__file__), name))


@pytest.fixture
def pub(tmp_path):
    publisher = Publisher(tmp_path / "root")
    result = publisher.mkfs()
    assert result.returncode == 0, result.stderr.decode()
    return publisher


@pytest.fixture
def pair(tmp_path):
    gateway = tmp_path / "gateway"
    first, second = Publisher(tmp_path / "a", "pubA", gateway), Publisher(tmp_path / "b", "pubB", gateway)
    keys = make_keys(tmp_path / "keys")
    for publisher in (first, second):
        result = publisher.mkfs(key_dir=keys)
        assert result.returncode == 0, result.stderr.decode()
    return first, second
