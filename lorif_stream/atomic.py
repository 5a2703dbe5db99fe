"""Outputs that appear whole or not at all: a command that fails leaves every existing file as it was.

Each output is written to a temporary file beside its target (same directory, so the rename stays
on one file system and is atomic) and renamed over the target only once the command succeeded.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def temp_beside(path: str | os.PathLike) -> Path:
    """A new, empty, uniquely named file in `path`'s directory (created with the directory if needed):
    two commands writing the same target never share a temporary."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder: give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    return Path(name)


def publish(temp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move a finished temporary over its target (atomic on POSIX), keeping the target's mode when it
    existed (mkstemp makes 0600 files) and else the usual umask-derived one."""
    temp, path = Path(temp), Path(path)
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    os.chmod(temp, mode)
    os.replace(temp, path)


def discard(temp: str | os.PathLike | None) -> None:
    if temp is not None:
        Path(temp).unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """`text` into `path`, atomically (see the module docstring)."""
    temp = temp_beside(path)
    try:
        with open(temp, "w", encoding="utf-8") as fh:
            fh.write(text)
        publish(temp, path)
    except BaseException:
        discard(temp)
        raise
    return Path(path)
