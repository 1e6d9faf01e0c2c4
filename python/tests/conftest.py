"""Fixtures of the Python tests (helpers are in ``support.py``)."""

from __future__ import annotations

import pytest

import flowgate


@pytest.fixture(autouse=True)
def _doctest_flowgate(doctest_namespace: dict) -> None:  # type: ignore[type-arg]
    doctest_namespace["flowgate"] = flowgate
