"""Test-wide set-up: an empty models folder, so a user's own LoRAs or embeddings never leak in."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _empty_models_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["EMAKI_MODELS"] = str(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: tiny networks gain nothing from threads and lose a lot
    when other jobs share the machine's cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_sd1():
    """A tiny SD 1.x bundle with random weights (seed 0), shared by the tests that only read it."""
    from emaki.models.tiny import make_tiny_bundle

    return make_tiny_bundle("sd1", seed=0)


@pytest.fixture(scope="session")
def tiny_sd1_pipe(tiny_sd1):
    from emaki.pipelines.txt2img import Pipeline

    return Pipeline(tiny_sd1)
