"""Shared fixtures: tiny model kits built once per test session, fresh projects, generated videos."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No test may reach a hub: the kits are built locally and loaded from folders.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """ModelChoice with paths of the tiny Wan I2V pipeline and tiny BLIP-2 folders (built once)."""
    from engine.core.models import ensure_tiny_kits

    return ensure_tiny_kits(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run faster on one thread than on two contended ones (CI and dev boxes have 2 cores; extra
    threads only spin: up to 20x slower steps measured). Use with pytest.mark.usefixtures."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def project(tmp_path, tiny_models):
    """An empty project in a folder whose name has a space, a quote and non-ASCII characters."""
    from engine.core.layout import Project

    return Project.open(tmp_path / "my 'project' é", wan_model=tiny_models.wan,
                        captioner_model=tiny_models.captioner)


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory) -> Path:
    """A studio home holding the demo project and tiny kits, as a first launch creates them."""
    from engine.demo import ensure_demo_project

    home = tmp_path_factory.mktemp("studio home")
    ensure_demo_project(home)
    return home
