"""Regenerate the Python modules from the `.proto` files (the single source of truth).

Run from anywhere: ``python -m lowband.protocols.generate``. Writes ``*_pb2.py``, ``*_pb2_grpc.py``
and ``*_pb2.pyi`` next to each ``.proto``. The protos are compiled as ``lowband/protocols/*.proto``
(protoc's virtual include path), so the generated imports name the installed package.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
VIRTUAL_DIR = "lowband/protocols"


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def generate(out_dir: Path = PROTO_DIR) -> None:
    """Compile every proto; the generated modules land directly in `out_dir`."""
    import grpc_tools
    from grpc_tools import protoc  # test/dev dependency only

    include = Path(grpc_tools.__file__).resolve().parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        for proto in proto_files():
            args = [
                "grpc_tools.protoc",
                f"-I{VIRTUAL_DIR}={PROTO_DIR}",
                f"-I{include}",
                f"--python_out={tmp}",
                f"--grpc_python_out={tmp}",
                f"--pyi_out={tmp}",
                f"{VIRTUAL_DIR}/{proto.name}",
            ]
            if protoc.main(args) != 0:
                raise RuntimeError(f"protoc failed on {proto}")
        out_dir.mkdir(parents=True, exist_ok=True)
        for produced in sorted((Path(tmp) / VIRTUAL_DIR).iterdir()):
            shutil.copyfile(produced, out_dir / produced.name)


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR)
