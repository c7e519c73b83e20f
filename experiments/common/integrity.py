"""Integrity manifests: a checksum of every file of a committed checkpoint step.

`write_manifest(step_dir)` is called once a step has committed; it records the size
and SHA-256 of every file below `step_dir` in `step_dir/MANIFEST_FILE`, written last
and atomically (temporary file + rename). `verify_manifest(step_dir)` re-reads every
file listed and says what is wrong, if anything: a step without a manifest was never
sealed (the process stopped between orbax's commit and the manifest), and a step
whose files differ from their manifest was damaged afterwards.

Example:
    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> with open(os.path.join(d, "a.bin"), "wb") as f:
    ...     _ = f.write(b"1234")
    >>> write_manifest(d)
    >>> verify_manifest(d) is None
    True
    >>> with open(os.path.join(d, "a.bin"), "wb") as f:
    ...     _ = f.write(b"1235")
    >>> verify_manifest(d)
    'file a.bin does not match its checksum'
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

MANIFEST_FILE = "integrity.json"
_VERSION = 1
_CHUNK = 1 << 22


def _files(step_dir: str) -> list[str]:
    """Relative paths of every file below `step_dir` except the manifest, sorted."""
    found = []
    for root, _, names in os.walk(step_dir):
        for name in names:
            path = os.path.relpath(os.path.join(root, name), step_dir)
            if path != MANIFEST_FILE and not path.startswith(MANIFEST_FILE + "."):
                found.append(path)
    return sorted(found)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(step_dir: str) -> None:
    """Writes `step_dir/MANIFEST_FILE` with the size and SHA-256 of every other file."""
    files = {
        rel: {"size": os.path.getsize(os.path.join(step_dir, rel)),
              "sha256": _sha256(os.path.join(step_dir, rel))}
        for rel in _files(step_dir)
    }
    path = os.path.join(step_dir, MANIFEST_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"version": _VERSION, "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def verify_manifest(step_dir: str) -> Optional[str]:
    """Checks every file of `step_dir` against its manifest.

    Returns:
        None if every listed file is present with its size and checksum; otherwise a
        short reason naming the first bad file (relative to `step_dir`).
    """
    path = os.path.join(step_dir, MANIFEST_FILE)
    if not os.path.exists(path):
        return (f"it has no {MANIFEST_FILE} (the save did not complete: the process "
                "stopped before the checkpoint was sealed)")
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        if manifest.get("version") != _VERSION or not isinstance(files, dict) or not files:
            raise ValueError("unexpected content")
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its {MANIFEST_FILE} is damaged ({type(err).__name__}: {err})"
    for rel, expected in sorted(files.items()):
        full = os.path.join(step_dir, rel)
        if not os.path.isfile(full):
            return f"file {rel} is missing"
        size = os.path.getsize(full)
        if size != expected.get("size"):
            return f"file {rel} has {size} bytes, expected {expected.get('size')}"
        if _sha256(full) != expected.get("sha256"):
            return f"file {rel} does not match its checksum"
    return None
