"""Fixtures for the deployment tests: helm and checkov, fetched by `make tools` when missing."""

from __future__ import annotations

from pathlib import Path

import pytest
from deploy_tools import tool


@pytest.fixture(scope="session")
def helm() -> Path:
    return tool("bin/helm")


@pytest.fixture(scope="session")
def checkov() -> Path:
    return tool("checkov/bin/checkov")
