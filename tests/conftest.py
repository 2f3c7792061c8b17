"""Shared fixtures: one tiny random checkpoint per test session, built into a private cache."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def parity_cache(tmp_path_factory):
    """Build built-ins into a session cache so tests never touch the user's cache."""
    cache = os.environ.get("PARITY_TEST_CACHE") or str(tmp_path_factory.mktemp("parity-cache"))
    os.environ["PARITY_CACHE"] = cache
    return cache


@pytest.fixture(scope="session")
def tiny_dir(parity_cache):
    from parity.models import ensure_builtin

    return ensure_builtin("tiny")


@pytest.fixture(scope="session")
def prompt():
    from parity.prompts import Prompt

    return Prompt(id="p0", text="Hello world, this is a test.", speaker="vivian", language="english", line=1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
