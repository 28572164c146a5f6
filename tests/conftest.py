import os

import pytest
import torch

# MEMGUARD_TEST_THREADS=1 when several torch processes share the machine (oversubscription costs 10x or more).
torch.set_num_threads(int(os.environ.get("MEMGUARD_TEST_THREADS") or max(1, min(2, os.cpu_count() or 1))))


@pytest.fixture(scope="session")
def sd_pipe():
    from guard.testing import tiny_sd_pipeline

    return tiny_sd_pipeline("epsilon")


@pytest.fixture(scope="session")
def sd2_pipe():
    from guard.testing import tiny_sd_pipeline

    return tiny_sd_pipeline("v_prediction", seed=1)


@pytest.fixture(scope="session")
def sdxl_pipe():
    from guard.testing import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline(seed=2)


@pytest.fixture(autouse=True)
def _isolated_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMGUARD_CACHE_DIR", str(tmp_path / "memguard-cache"))
