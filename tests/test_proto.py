"""The committed API modules match proto/tandem/v1/*.proto: regenerate with `python -m proto.generate`."""

from pathlib import Path

from proto.generate import ROOT, generate


def test_generated_modules_are_up_to_date(tmp_path: Path):
    fresh = generate(tmp_path)
    assert fresh, "no modules generated"
    for path in fresh:
        committed = ROOT / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing: run python -m proto.generate"
        assert committed.read_bytes() == path.read_bytes(), f"{committed} is stale: run python -m proto.generate"
