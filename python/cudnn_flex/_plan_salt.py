"""The digest of this library's own code that every stored plan's key carries (csrc/plan_cache.h).

A plan stored on disk is the lowering of a recorded program by one version of cudnn-flex: the
rewrites in program/replay.py, masks/lower.py and the C++ bridge decide what cuDNN compiled. A
process running other code must not load it, even where the program and shapes are the same, so
the key holds a digest of the package's Python sources and of the extension file (its size and
modification time: hashing its megabytes at every import would cost more than it saves).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional


def lowering_digest(package_dir: Optional[Path] = None) -> str:
    """Hex digest of the package's .py files (paths and contents) and its extension files."""
    root = Path(package_dir) if package_dir is not None else Path(__file__).parent
    h = hashlib.blake2b(digest_size=16)
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    for path in sorted(root.glob("_C*.so")):
        st = path.stat()
        h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}\0".encode())
    return h.hexdigest()
