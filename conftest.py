"""Pytest configuration for the docstring examples (``--doctest-modules genrefocus_core``)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _doctest_torch(doctest_namespace):
    """Docstring examples use ``torch`` without importing it, like the modules they document."""
    doctest_namespace["torch"] = torch
