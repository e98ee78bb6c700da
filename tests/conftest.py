import os
from pathlib import Path

import jax
import pytest

# Strict rank promotion: silent broadcasting between arrays of different rank fails (Equinox-style).
jax.config.update("jax_numpy_rank_promotion", "raise")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def real_data_dir() -> Path | None:
    """The directory with the real datasets: $BANG_DATA_DIR, else ../shared/data if present."""
    env = os.environ.get("BANG_DATA_DIR")
    if env and Path(env).is_dir():
        return Path(env)
    return SHARED_DATA if SHARED_DATA.is_dir() else None


@pytest.fixture(scope="session")
def data_dir():
    d = real_data_dir()
    if d is None:
        pytest.skip("real data not available (set BANG_DATA_DIR)")
    return d


@pytest.fixture(scope="session")
def mnist(data_dir):
    from bang_jax.data import load_mnist

    ds = load_mnist(data_dir)
    if ds.source.startswith("files") is False:
        pytest.skip("MNIST files not found")
    return ds


@pytest.fixture(scope="session")
def cifar10(data_dir):
    """The real CIFAR-10, loaded (and checksummed) once per test session."""
    from bang_jax.data import load_dataset

    try:
        return load_dataset("cifar10", data_dir, source="files")
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"CIFAR-10 files not available: {err}")
