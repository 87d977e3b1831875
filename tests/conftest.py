from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_SAMPLE = ROOT.parent / "shared" / "av2_sample"


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    scenario = next((SHARED_SAMPLE / "val").iterdir(), None) if (SHARED_SAMPLE / "val").is_dir() else None
    if scenario is None:
        pytest.fail(f"the shared AV2 sample is missing: expected it at {SHARED_SAMPLE}")
    return scenario
