"""Shared pytest set-up for moeforge.

* Pins torch to 2 intra-op threads (the reference CI machine has 2 cores; more
  threads than cores only slows the multi-rank gloo tests down).
* Makes the repo's packages importable even without `pip install -e .`, but only
  when they are not importable already, so an installed tree is never shadowed.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
_PACKAGES = ("models", "parallel", "train", "data")


def _ensure_importable() -> None:
    try:
        missing = [p for p in _PACKAGES if importlib.util.find_spec(p) is None]
    except (ImportError, ValueError):
        missing = list(_PACKAGES)
    if missing and str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


_ensure_importable()

try:
    import torch
except ImportError:  # pragma: no cover - torch is a core dependency
    torch = None

if torch is not None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """Absolute path of the repository root (where pyproject.toml lives)."""
    return REPO_ROOT


@pytest.fixture
def single_thread():
    """One intra-op thread for tests of tiny tensors: avoids OpenMP stalls on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
