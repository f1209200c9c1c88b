"""Builds pyiommufd._uapi from our own declarations in include-bindings/.

Out-of-line ABI mode: cffi parses the cdef text here, at build time, and
writes a pure-Python module that carries the parsed types. Importing it needs
neither a C compiler nor pycparser. Run ``python src/pyiommufd/_uapi_build.py``
to regenerate it in place while developing.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BINDINGS = REPO / "include-bindings"

# Order matters only for readability of errors: each file is self-contained.
DECLARATION_FILES = (
    "linux-7.3/liveupdate.h",
    "linux-7.3/iommufd.h",
    "linux-7.3/vfio.h",
    "system.h",
    "lu-v1.h",
    "lu-v2.h",
)


def cdef_text(root: Path = BINDINGS) -> str:
    parts = []
    for name in DECLARATION_FILES:
        path = root / name
        parts.append(f"/* ---- {name} ---- */\n{path.read_text()}")
    return "\n".join(parts)


def make_ffi(root: Path = BINDINGS) -> Any:
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(cdef_text(root))
    ffi.set_source("pyiommufd._uapi", None)
    return ffi


def emit(target: str | Path, root: Path = BINDINGS) -> None:
    make_ffi(root).emit_python_code(str(target))


if __name__ == "__main__":
    emit(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("_uapi.py"))
