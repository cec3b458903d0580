#!/usr/bin/env python3
"""Generates the Python stubs of chime's gRPC contract into src/chime_sdk/_proto/.

    python scripts/gen_proto.py            # rewrite the committed stubs
    python scripts/check_proto_drift.py    # fail when they differ from proto/

The stubs come from every proto/chime/v1/*.proto through grpcio-tools (messages
with `--pyi_out` type stubs, plus the gRPC service stubs). protoc names modules
after the proto package (`chime.v1`); the generated imports and module names are
rewritten to the subpackage `chime_sdk._proto`, so the SDK never puts a top-level
`chime` package on anyone's path.

The output depends on the grpcio-tools version (it stamps the protobuf and grpcio
versions it needs into the code), so the version is pinned here and in
pyproject.toml's `dev` extra; another version is refused rather than producing a
diff nobody asked for.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

GRPCIO_TOOLS_VERSION = "1.76.0"

SDK_DIR = Path(__file__).resolve().parent.parent
PROTO_ROOT = SDK_DIR.parent.parent / "proto"
PROTO_DIR = PROTO_ROOT / "chime" / "v1"
OUT_DIR = SDK_DIR / "src" / "chime_sdk" / "_proto"

INIT = '''"""Generated gRPC stubs of proto/chime/v1 (scripts/gen_proto.py; do not edit)."""
'''


def check_tools_version() -> None:
    """Exits with a clear message when grpcio-tools is missing or not the pin."""
    try:
        found = metadata.version("grpcio-tools")
    except metadata.PackageNotFoundError:
        sys.exit(
            f"grpcio-tools is not installed; install grpcio-tools=={GRPCIO_TOOLS_VERSION} "
            "(pip install -e 'sdk/python[dev]')"
        )
    if found != GRPCIO_TOOLS_VERSION:
        sys.exit(
            f"grpcio-tools {found} is installed but the stubs are generated with "
            f"{GRPCIO_TOOLS_VERSION}; install grpcio-tools=={GRPCIO_TOOLS_VERSION}"
        )


def _rewrite(text: str) -> str:
    # `from chime.v1 import x_pb2 as y` (service stubs) -> a relative import.
    text = re.sub(r"^from chime\.v1 import ", "from . import ", text, flags=re.M)
    # The module name given to the message classes (their `__module__`).
    text = re.sub(r"'chime\.v1\.(\w+_pb2)'", r"'chime_sdk._proto.\1'", text)
    if re.search(r"^\s*(from|import)\s+chime\.v1\b", text, flags=re.M):
        raise SystemExit("generated code still imports the `chime.v1` package; update _rewrite")
    return text


def generate(out_dir: Path) -> list[str]:
    """Writes the stubs into `out_dir` (created, not cleaned); answers the file names."""
    check_tools_version()
    protos = sorted(PROTO_DIR.glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files in {PROTO_DIR}")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(p.relative_to(PROTO_ROOT)) for p in protos),
        ]
        subprocess.run(cmd, check=True, cwd=PROTO_ROOT)
        names = ["__init__.py"]
        (out_dir / "__init__.py").write_text(INIT)
        for path in sorted((Path(tmp) / "chime" / "v1").iterdir()):
            (out_dir / path.name).write_text(_rewrite(path.read_text()))
            names.append(path.name)
    return names


def main() -> None:
    check_tools_version()
    if OUT_DIR.exists():
        shutil.rmtree(OUT_DIR)
    names = generate(OUT_DIR)
    print(f"wrote {len(names)} files to {OUT_DIR.relative_to(SDK_DIR)}")


if __name__ == "__main__":
    main()
