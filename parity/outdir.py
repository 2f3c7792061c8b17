"""The run directory (``--out``): its lock, its run marker and atomic writes into it.

- **Lock.** ``.parity.lock`` inside ``--out``, created exclusively (``O_CREAT|O_EXCL``) and holding
  the pid, the process start time and the command. A second ``parity run``/``bisect`` on the same
  directory is refused (exit 2, one line) while the holder lives; a lock whose process is gone (or
  whose pid now belongs to another process, told apart by its start time) is stale and taken over.
- **Run marker.** ``.parity-run.json`` names every top-level entry parity created in the
  directory. ``--force`` deletes exactly those entries and nothing else: a directory without the
  marker is never wiped, whatever its files are called (a project with its own ``run.json`` and a
  ``thesis.tex`` survives).
- **Atomic writes.** Every file is written to a hidden temporary next to it, flushed and renamed
  over the target, so a killed run never leaves a half-written file; a full disk is an
  :class:`OutOfSpace` (exit 3 mid-run) and the temporary is removed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

from parity.errors import BadInput, EngineFailure

LOCK_NAME = ".parity.lock"
MARKER_NAME = ".parity-run.json"
MARKER_KIND = "parity-run-marker"
# errno values meaning "the disk cannot take this write" (full, quota, read-only, I/O error).
NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG}


class OutOfSpace(EngineFailure):
    """A write into the run directory failed because the disk is full (or read-only): exit 3."""


def is_no_space(e: BaseException) -> bool:
    """True for an OSError that means the disk cannot take the write."""
    return isinstance(e, OSError) and e.errno in NO_SPACE


def is_temporary(name: str) -> bool:
    """parity's own temporary files (``.NAME.tmp``, ``.NAME.tmp.wav``), left only by a hard kill."""
    return name.startswith(".") and (".tmp" in name or name == ".write-test")


# --- atomic writes -------------------------------------------------------------------------------


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary and a rename; OutOfSpace on a full disk."""
    from parity import faults

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        faults.on_write(path)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
        os.replace(tmp, path)
    except OSError as e:
        _discard(tmp)
        if is_no_space(e):
            raise OutOfSpace(f"no space left writing '{path}' ({e.strerror}); free some disk space") from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """UTF-8 text, atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    """JSON (indent 1, UTF-8), atomically."""
    from parity import strictjson

    atomic_write_text(path, strictjson.dumps(data, indent=1, ensure_ascii=False))  # never a bare NaN


def atomic_write_with(path: Path, write) -> None:
    """Atomic write through a writer callback ``write(tmp_path)`` (for libraries that write files
    themselves: safetensors, soundfile, pandas). The temporary keeps the target's suffix."""
    from parity import faults

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{''.join(path.suffixes[-1:])}")
    try:
        faults.on_write(path)
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        _discard(tmp)
        if is_no_space(e):
            raise OutOfSpace(f"no space left writing '{path}' ({e.strerror}); free some disk space") from None
        raise
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: Path) -> None:
    try:
        tmp.unlink()
    except OSError:
        pass


# --- the lock ------------------------------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        return text.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    now = _start_time(pid)
    return started is None or now is None or now == started


class RunLock:
    """An exclusive lock on a run directory (see the module docstring). Use as a context manager
    or call :meth:`acquire` / :meth:`release`."""

    def __init__(self, out: Path, command: str = ""):
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self.command = command
        self.held = False

    def acquire(self) -> "RunLock":
        """Create the lock, taking over a stale one; BadInput (exit 2) if another run holds it."""
        me = {"pid": os.getpid(), "start_ticks": _start_time(os.getpid()),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": self.command}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = read_lock(self.path)
                if holder is not None and _alive(holder.get("pid", -1), holder.get("start_ticks")):
                    raise BadInput(busy_message(self.out, holder)) from None
                self._remove_stale(holder)
                continue
            except OSError as e:
                raise BadInput(f"--out '{self.out}' is not writable ({e.strerror}); choose a writable directory") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise BadInput(f"--out '{self.out}': could not take the lock {self.path} (another run keeps taking it); try again")

    def _remove_stale(self, holder: dict | None) -> None:
        # Rename first, so that two runs taking over the same stale lock cannot both remove the
        # lock the other has just created.
        grave = self.path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
        try:
            os.rename(self.path, grave)
            if read_lock(grave) != holder:  # someone else's fresh lock: put it back
                os.rename(grave, self.path)
            else:
                grave.unlink()
        except OSError:
            pass

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if not self.held:
            return
        self.held = False
        holder = read_lock(self.path)
        if holder is not None and holder.get("pid") == os.getpid():
            try:
                self.path.unlink()
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def read_lock(path: Path) -> dict | None:
    """The lock's content, or None if it is missing or unreadable (a half-written lock)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8")[:4096])
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None


def busy_message(out: Path, holder: dict) -> str:
    """The one line for a directory another live run is writing to."""
    return (f"--out '{out}' is in use by another parity run (pid {holder.get('pid')}, started {holder.get('started')}); "
            "wait for it to finish or choose another directory")


def check_not_locked(out: Path) -> None:
    """Refuse (without changing anything) a directory a live parity process holds."""
    holder = read_lock(Path(out) / LOCK_NAME)
    if holder is not None and holder.get("pid") != os.getpid() and _alive(holder["pid"], holder.get("start_ticks")):
        raise BadInput(busy_message(Path(out), holder))


# --- the run marker ------------------------------------------------------------------------------


def read_marker(out: Path) -> list[str] | None:
    """The entries a parity run created in ``out`` (from its marker), or None when there is no
    valid marker (then the directory is not known to be parity's)."""
    path = Path(out) / MARKER_NAME
    try:
        if not path.is_file() or path.stat().st_size > 1 << 20:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("kind") != MARKER_KIND or not isinstance(data.get("entries"), list):
        return None
    entries = [e for e in data["entries"] if isinstance(e, str) and _plain_name(e)]
    return entries


def _plain_name(name: str) -> bool:
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def write_marker(out: Path, entries: Iterable[str]) -> None:
    """Record (merging with an existing marker) the top-level entries parity created in ``out``."""
    known = set(read_marker(out) or [])
    known.update(entries)
    atomic_write_json(Path(out) / MARKER_NAME, {"kind": MARKER_KIND, "entries": sorted(known),
                                                "note": "written by parity; --force deletes exactly these entries"})


def force_plan(out: Path) -> list[Path]:
    """What ``--force`` would delete in ``out``: the marker's entries that exist, our temporaries
    and the marker itself. BadInput when ``out`` is non-empty and has no marker."""
    out = Path(out)
    entries = sorted(e for e in os.listdir(out) if e != LOCK_NAME)  # the lock is the caller's own
    if not entries:
        return []
    marked = read_marker(out)
    if marked is None:
        shown = entries[0]
        raise BadInput(f"--force refuses to delete '{out}': it has no parity run marker ({MARKER_NAME}), so it is not "
                       f"known to be a parity run (it holds '{shown}'); pass a new or empty directory")
    doomed = [out / e for e in entries if e in marked or is_temporary(e)]
    return doomed + [out / MARKER_NAME]


def wipe(out: Path) -> None:
    """Delete what :func:`force_plan` names (call with the lock held)."""
    for path in force_plan(out):
        if path.name == LOCK_NAME:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def foreign_entries(out: Path) -> list[str]:
    """Entries of ``out`` that parity did not create (they are never deleted)."""
    marked = set(read_marker(out) or [])
    return [e for e in sorted(os.listdir(out)) if e not in marked and not is_temporary(e) and e not in (LOCK_NAME, MARKER_NAME)]
