"""Regenerates the Python modules of the public API from proto/tandem/v1/*.proto: `python -m proto.generate`.

The modules are committed, so users need no protoc; tests/test_proto.py fails when they are stale. Paths are
relative to the repository root so the modules import as `proto.tandem.v1.tandem_pb2`.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "proto").rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Writes the modules under `out_dir` (mirroring proto/...) and returns their paths."""
    from importlib.resources import files

    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    well_known_types = files("grpc_tools") / "_proto"  # google/protobuf/struct.proto
    args = ["protoc", f"-I{ROOT}", f"-I{well_known_types}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *PROTOS]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {', '.join(PROTOS)}")
    return sorted(p for p in (out_dir / "proto").rglob("*_pb2*.py*") if p.suffix in (".py", ".pyi"))


if __name__ == "__main__":
    for path in generate(ROOT):
        print(path.relative_to(ROOT))
