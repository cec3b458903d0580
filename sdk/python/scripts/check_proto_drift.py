#!/usr/bin/env python3
"""Fails when src/chime_sdk/_proto/ is not what scripts/gen_proto.py makes of proto/.

Regenerates the stubs into a temporary directory and compares file by file; on a
difference it names each file and exits 1 (fix: `python scripts/gen_proto.py` and
commit). Exit 0: the committed stubs are exactly the generated ones.
"""

from __future__ import annotations

import difflib
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gen_proto  # noqa: E402  (the generator lives next to this script)


def drift(committed: Path) -> list[str]:
    """Problems found comparing `committed` with fresh stubs, one line each."""
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        gen_proto.generate(fresh)
        want = {p.name for p in fresh.iterdir() if p.is_file()}
        have = (
            {p.name for p in committed.iterdir() if p.is_file() and p.suffix in (".py", ".pyi")}
            if committed.is_dir()
            else set()
        )
        for name in sorted(want - have):
            problems.append(f"{committed / name}: missing (proto/ has a file it comes from)")
        for name in sorted(have - want):
            problems.append(f"{committed / name}: not generated from any proto/ file")
        for name in sorted(want & have):
            new = (fresh / name).read_text()
            old = (committed / name).read_text()
            if new != old:
                diff = difflib.unified_diff(
                    old.splitlines(), new.splitlines(), "committed", "generated", lineterm="", n=1
                )
                # Serialized descriptors are one very long line: cut lines for reading.
                excerpt = "\n    ".join(line[:160] + ("…" if len(line) > 160 else "") for line in list(diff)[:12])
                problems.append(f"{committed / name}: differs from the generated stub\n    {excerpt}")
    return problems


def main() -> int:
    problems = drift(gen_proto.OUT_DIR)
    if problems:
        for p in problems:
            print(f"proto drift: {p}", file=sys.stderr)
        print(
            "regenerate with `python sdk/python/scripts/gen_proto.py` and commit the result",
            file=sys.stderr,
        )
        return 1
    print(f"proto stubs up to date ({gen_proto.OUT_DIR})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
