"""Regenerate the Python gRPC code in `jaxserve/proto/v1/` from `proto/jaxserve/v1/*.proto`.

    python -m jaxserve.proto.generate            # rewrite jaxserve/proto/v1 in place
    python -m jaxserve.proto.generate --out DIR  # write elsewhere (the staleness test compares the bytes)

Needs grpcio-tools (a dev dependency); the generated files are committed, so serving never does."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "proto"
PROTO_PACKAGE_DIR = PROTO_ROOT / "jaxserve" / "v1"
GENERATED_DIR = Path(__file__).resolve().parent / "v1"

# protoc names imports after the proto package (`jaxserve.v1`); the code lives in `jaxserve.proto.v1`.
_IMPORT_RE = re.compile(r"^from jaxserve\.v1 import ", re.MULTILINE)
_INIT = '"""Generated from proto/jaxserve/v1 by `python -m jaxserve.proto.generate`; do not edit."""\n'


def proto_files() -> list[Path]:
    return sorted(PROTO_PACKAGE_DIR.glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Write the generated modules for every .proto into out_dir (replacing what is there); returns them."""
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp}",
               f"--grpc_python_out={tmp}", f"--pyi_out={tmp}",
               *(str(p.relative_to(PROTO_ROOT)) for p in proto_files())]
        result = subprocess.run(cmd, cwd=PROTO_ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"protoc failed ({result.returncode}):\n{result.stderr}")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        written = []
        for src in sorted(Path(tmp, "jaxserve", "v1").iterdir()):
            dst = out_dir / src.name
            dst.write_text(_IMPORT_RE.sub("from jaxserve.proto.v1 import ", src.read_text()))
            written.append(dst)
        init = out_dir / "__init__.py"
        init.write_text(_INIT)
        written.append(init)
    return sorted(written)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=GENERATED_DIR, help="output folder")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)


if __name__ == "__main__":
    main()
