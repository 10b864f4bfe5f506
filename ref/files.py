"""Outputs written atomically: never half-written at their destination, never replaced without asking.

Every command that writes a file or a model directory goes through `atomic_output` (one formulation for
ref/, hypermoe/, export/ and conformance/; stdlib only):

    with atomic_output("m.onnx", force=False) as tmp:  # the destination is checked here, before any work
        write(tmp)                                     # tmp = .m.onnx.tmp-PID-RANDOM/m.onnx
        check(tmp)                                     # the caller's own check of what it wrote
    # now m.onnx is the new file, fsynced and renamed in

On any exception, KeyboardInterrupt or SystemExit inside the block (hypermoe.cli turns SIGTERM and SIGHUP
into a KeyboardInterrupt) the staging folder is removed and the destination is left as it was.

The staging folder lies in the destination's own directory: the last step is then a rename within one
filesystem, atomic on POSIX, and files a writer puts next to its output (ONNX external data, NAME.data)
are staged and renamed with it. A file's temporary keeps the final name inside the staging folder, so
that references between the files (an .onnx's external-data location) already name the final files.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

FORCE_HINT = "pass --force to replace it"


def check_output(path: str | os.PathLike, *, force: bool = False, directory: bool = False,
                 entries: Collection[str] | None = None) -> Path:
    """The destination as a Path, or a one-line ValueError naming it when writing there must not start.

    Refused: its directory is missing or takes no new files; a file is wanted and it is a directory (never
    replaced, even with force); it exists and force is False (an empty directory counts as absent: nothing in
    it is lost); with force, a directory holding an entry not in `entries` (for a model directory: anything
    but config.json and weights.npz), so that a mistyped `-o .` never deletes a folder of other files.
    """
    path = _refuse_existing(Path(path), force, directory, entries)
    os.rmdir(_staging(path))  # creating an entry is the only sure test: as root, os.access passes /proc
    return path


@contextmanager
def atomic_output(path: str | os.PathLike, *, force: bool = False, directory: bool = False,
                  entries: Collection[str] | None = None) -> Iterator[Path]:
    """Yield where to write `path` (check_output's rules, checked on entry): a file's path inside a staging
    folder (write sidecar files next to it, under their final names), or the staging folder itself when
    `directory`. On a normal exit every staged file is fsynced and renamed onto its destination."""
    path = _refuse_existing(Path(path), force, directory, entries)
    staging = _staging(path)
    replaced = False
    try:
        yield staging if directory else staging / path.name
        _fsync_tree(staging)
        _refuse_existing(path, force, directory, entries)  # something may have appeared there meanwhile
        try:
            if directory:
                _swap_directory(staging, path)
            else:
                _rename_files(staging, path, force)
        except OSError as err:
            raise ValueError(f"cannot write {path}: {err.strerror or err}") from None
        replaced = True
        _fsync_dir(path.parent)
    except KeyboardInterrupt as err:  # the CLI prints the note with its "interrupted" line
        if not replaced:
            err.add_note(f"nothing written to {path}")
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _refuse_existing(path: Path, force: bool, directory: bool, entries: Collection[str] | None) -> Path:
    parent = path.parent  # Path("m.onnx").parent is Path("."), so relative names work
    if not parent.is_dir():
        raise ValueError(f"output directory {parent} does not exist" if not parent.exists()
                         else f"output path {path}: {parent} is not a directory")
    if not directory and path.is_dir():
        raise ValueError(f"output path {path} is a directory; give a file name such as {path / 'out'}")
    if not os.path.lexists(path) or (directory and path.is_dir() and not any(path.iterdir())):
        return path
    if not force:
        raise ValueError(f"{path} already exists; {FORCE_HINT}")
    if directory and path.is_dir() and entries is not None:
        stray = sorted(set(os.listdir(path)) - set(entries))
        if stray:
            raise ValueError(f"{path} holds {', '.join(stray[:3])}{', ...' if len(stray) > 3 else ''} besides "
                             f"{', '.join(sorted(entries))}; not replaced, even with --force")
    return path


def _staging(path: Path) -> Path:
    """A new empty folder .NAME.tmp-PID-RANDOM next to `path` (mode from the umask, like the final output)."""
    staging = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        staging.mkdir()
    except OSError as err:
        raise ValueError(f"cannot write {path}: cannot create files in {path.parent} ({err.strerror})") from None
    return staging


def _rename_files(staging: Path, path: Path, force: bool) -> None:
    """Move each staged file onto its destination: sidecars (ONNX external data) first, `path` last. The file a
    reader opens changes last, so a new .onnx never points at missing data; a crash between the renames
    leaves the previous .onnx next to the new data file (rerun the command to get a consistent pair)."""
    names = sorted(os.listdir(staging))
    if path.name not in names:
        raise ValueError(f"nothing was written to {path}")
    sidecars = [name for name in names if name != path.name]
    for name in sidecars:
        _refuse_existing(path.parent / name, force, False, None)
    for name in sidecars + [path.name]:
        os.replace(staging / name, path.parent / name)


def _swap_directory(staging: Path, path: Path) -> None:
    """Rename the staged directory onto `path`. rename(2) replaces a missing or empty directory atomically;
    a full one (or a file, with force) is first renamed aside, then the new one in, then the old one removed."""
    if not os.path.lexists(path) or (path.is_dir() and not any(path.iterdir())):
        os.replace(staging, path)
        return
    aside = path.parent / f".{path.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(path, aside)
    # A process killed here (SIGKILL, power loss) leaves no `path`: the old version lies complete at `aside`
    # and the new one complete at `staging`; rename either one back by hand. Exceptions put the old one back.
    try:
        os.rename(staging, path)
    except BaseException:
        os.rename(aside, path)
        raise
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside)
    else:
        aside.unlink()


def _fsync_tree(staging: Path) -> None:
    """Data on disk before the rename, so that a crash right after it cannot leave an empty or partial file."""
    for root, _, names in os.walk(staging):
        for name in names:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (corpora and downloads can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
