"""Paths read out of a folder's own files (a `modules.json` entry, a tokenizer file name) stay inside that folder.

A checkpoint folder is data from elsewhere: a path written in one of its files must not lead the code that reads
it to another place on disk. `safe_join(folder, relative, source)` is the one place that checks it:

    pooling = safe_join(model_folder, module["path"], f"{model_folder / 'modules.json'}, module 1 'path'")

An absolute path and a `..` step are refused by name (the error says which file and entry it came from); so is a
path that resolves outside the folder through a symbolic link. One layout is allowed on purpose: in a Hub cache
snapshot (`.../models--org--name/snapshots/<revision>/`) every file is a link into the repository's own
`blobs/` folder, which is where the files of that snapshot live.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath


__all__ = ["UnsafePathError", "allowed_roots", "copy_file", "files_in_folder", "safe_join"]


class UnsafePathError(ValueError):
    """A path read from a folder's files leads outside that folder."""


def allowed_roots(folder) -> list[Path]:
    """Where the files of `folder` may really live: the folder itself, and for a Hub cache snapshot its repository's
    `blobs/` folder."""
    folder = Path(folder).resolve()
    roots = [folder]
    if folder.parent.name == "snapshots":
        roots.append(folder.parent.parent / "blobs")
    return roots


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def safe_join(folder, relative, source: str) -> Path:
    """`folder / relative`, after checking that `relative` (read from `source`, a file and entry named in errors)
    is a relative path without `..` that does not resolve outside `folder` through a symbolic link."""
    folder = Path(folder)
    if not isinstance(relative, str):
        raise UnsafePathError(f"{source}: {relative!r} is not a path (expected a string relative to {folder}).")
    if not relative or "\x00" in relative:
        raise UnsafePathError(f"{source}: {relative!r} is an empty or invalid path (expected a file or folder "
                              f"name relative to {folder}).")
    windows = PureWindowsPath(relative)
    if PurePosixPath(relative).is_absolute() or windows.is_absolute() or windows.drive or windows.root:
        raise UnsafePathError(f"{source}: {relative!r} is an absolute path; a path read from {folder} must be "
                              f"relative to it.")
    if ".." in windows.parts:  # splits on both / and \, so "..\\x" is caught on every platform
        raise UnsafePathError(f"{source}: {relative!r} steps out with '..'; a path read from {folder} must stay "
                              f"inside it.")
    joined = folder / relative
    resolved = joined.resolve()
    if not _inside(resolved, allowed_roots(folder)):
        raise UnsafePathError(f"{source}: {relative!r} is, or passes through, a symbolic link to {resolved}, "
                              f"outside {folder}; it is not followed.")
    return joined


def copy_file(source_folder, relative: str, destination_folder, source: str) -> Path:
    """Copies the file `source_folder/relative` (its contents, never a link) to `destination_folder/relative`.
    Both sides are checked by `safe_join`; a symbolic link already at the destination is replaced by the file, not
    written through. Returns the destination."""
    origin = safe_join(source_folder, relative, source)  # also refuses an absolute `relative` or one with '..'
    if not stat.S_ISREG(origin.stat().st_mode):
        raise UnsafePathError(f"{source}: {relative!r} is not a regular file.")
    relative_parent = str(Path(relative).parent)  # "." for a file at the top
    parent = safe_join(destination_folder, relative_parent, f"{source} (its copy in {destination_folder})")
    parent.mkdir(parents=True, exist_ok=True)
    destination = parent / Path(relative).name
    if destination.is_symlink():
        destination.unlink()
    shutil.copy2(origin, destination)
    return destination


def files_in_folder(source_folder, relative: str, source: str) -> list[str]:
    """The files of the folder `source_folder/relative`, as paths relative to `source_folder`, each checked by
    `safe_join`: a link inside it to a file outside `source_folder` is refused, and so is a link to a folder, which
    is not followed (it could point back up and never end)."""
    top = safe_join(source_folder, relative, source)
    found = []
    for current, folders, files in os.walk(top):  # does not descend into linked folders (followlinks=False)
        inner = Path(relative, Path(current).relative_to(top))
        folders.sort()  # walked in a fixed order
        for name in folders:
            if (Path(current) / name).is_symlink():
                raise UnsafePathError(f"{source}: {str(inner / name)!r} is a symbolic link to a folder; it is not "
                                      f"followed.")
        for name in sorted(files):
            safe_join(source_folder, str(inner / name), source)
            found.append(str(inner / name))
    return found
