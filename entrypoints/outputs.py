"""Output folders that are safe to rerun: checked before work, locked while written, never mixed across settings.

* :func:`check_output_dir` fails before any model is loaded when the output path is a file, lies under a
  file, or cannot be written (one line, exit 2 through ``run_cli``).
* :class:`OutputLock` makes a second process that writes the same folder stop with a message naming the
  holder (pid, host, command); a lock left by a dead process (or by this process, e.g. an earlier in-process
  call) is taken over.
* :func:`check_same_settings` refuses to resume into a folder whose recorded configuration differs in a
  setting that changes the outputs (the old images would be kept under the new configuration's name).
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
from pathlib import Path

from entrypoints.common import UserError


def check_output_dir(path: str | os.PathLike, flag: str = "--output_dir") -> Path:
    """``path`` is (or can become) a writable folder; nothing is created here."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder; choose another {flag}")
    probe = path
    while not probe.exists():  # the nearest existing ancestor decides whether the folder can be made
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UserError(f"{flag} {path}: {probe} is a file, so the folder cannot be created")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {probe} is not writable (permission denied); choose another {flag}")
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class OutputLock:
    """An exclusive lock file ``<folder>/.<name>.lock`` holding ``{pid, host, command}`` of its holder."""

    def __init__(self, folder: Path, name: str):
        self.path = Path(folder) / f".{name}.lock"
        self.held = False

    def acquire(self) -> OutputLock:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and self._live_other(holder):
                    raise UserError(
                        f"{self.path.parent} is being written by another process (pid {holder.get('pid')} on "
                        f"{holder.get('host')}: {holder.get('command', '?')}); wait for it, use another output "
                        f"folder, or delete {self.path} if that process is gone") from None
                self.path.unlink(missing_ok=True)  # stale: its holder is gone (or is this process)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            atexit.register(self.release)
            return self
        raise UserError(f"could not take the lock {self.path}; delete it if no other process writes there")

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # unreadable or half-written: treat as stale

    @staticmethod
    def _live_other(holder: dict) -> bool:
        pid = holder.get("pid")
        if not isinstance(pid, int):
            return False
        if holder.get("host") != socket.gethostname():
            return True  # cannot check a process on another machine: assume it is running
        return pid != os.getpid() and _alive(pid)

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder is None or holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False


def check_same_settings(config_path: Path, new: dict, keys: list[str], overwrite: bool, what: str = "images") -> None:
    """Refuse (unless ``overwrite``) to resume into a folder whose ``config_path`` differs on ``keys``."""
    if overwrite or not config_path.exists():
        return
    try:
        old = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{config_path}: unreadable ({e}); pass --overwrite to regenerate the folder") from None
    diff = [f"{k} {old.get(k)!r} there, {new.get(k)!r} now" for k in keys if old.get(k, new.get(k)) != new.get(k)]
    if diff:
        raise UserError(f"{config_path.parent} holds {what} made with other settings ({'; '.join(diff)}); use another "
                        f"--output_dir, the same settings to resume, or --overwrite to regenerate them")


def finished_from_other_ranges(folder: Path, current: Path, wanted: set[str]) -> dict:
    """Entries of ``wanted`` prompts recorded in the folder's other ``global_statistics_{start}_{end}.json``
    files (an earlier run over another range, with the same settings — :func:`check_same_settings` made sure),
    so a rerun over a larger range keeps those images instead of regenerating them under stale statistics."""
    found: dict = {}
    for other in sorted(folder.glob("global_statistics_*_*.json")):
        if other == current or ".rank" in other.name:
            continue
        try:
            entries = json.loads(other.read_text())
        except (OSError, ValueError):
            continue  # unreadable: those images are simply regenerated
        found.update({k: v for k, v in entries.items() if k in wanted and k not in found})
    return found
