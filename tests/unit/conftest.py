"""Fast unit tests of the analysis core: synthetic inputs, no model. Every test here is marked
``unit`` so ``python -m pytest -q -m unit`` (or ``tests/unit``) runs them first and alone."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/unit/" in item.nodeid or item.nodeid.startswith("unit/"):
            item.add_marker(pytest.mark.unit)
