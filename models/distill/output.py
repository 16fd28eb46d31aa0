"""The output folder of a `student distill` run (`--out`): its files, and how they are written.

`samples.jsonl` and `questions.jsonl` are appended one complete line at a time followed by fsync,
so a SIGKILL leaves at most a torn last line, which the next run cuts off when it reads the file
back; `plan.json` and `manifest.json` are replaced atomically. An exclusive lock on the folder
refuses a second run into it. This is what makes a killed-and-restarted run end with exactly the
planned samples; what goes into the files is the run's business.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from models.distill.plan import DistillError

SAMPLES_FILE = "samples.jsonl"
QUESTIONS_FILE = "questions.jsonl"
PLAN_FILE = "plan.json"
MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".distill.lock"


class OutputFolder:
    """The files of one run in `path`: JSONL appended line by line with fsync, JSON replaced atomically."""

    def __init__(self, path: Path):
        self.path = path
        self._fds: dict[str, int] = {}
        self._lock_fd: int | None = None

    def file(self, name: str) -> Path:
        return self.path / name

    @contextlib.contextmanager
    def locked(self) -> Iterator[OutputFolder]:
        """Hold an exclusive lock on the folder (another run into it is refused), close files after."""
        if self.path.exists() and not self.path.is_dir():
            raise DistillError(f"--out {self.path} exists and is not a folder")
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.file(LOCK_FILE), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DistillError(f"another student distill run is writing to {self.path}") from None
        self._lock_fd = fd
        try:
            yield self
        finally:
            for handle in self._fds.values():
                os.close(handle)
            self._fds.clear()
            os.close(fd)
            self._lock_fd = None

    def clear(self) -> None:
        """Remove this tool's files (for --force); anything else in the folder stays."""
        for name in (SAMPLES_FILE, QUESTIONS_FILE, PLAN_FILE, MANIFEST_FILE):
            self.file(name).unlink(missing_ok=True)

    def read_json(self, name: str) -> dict[str, Any] | None:
        path = self.file(name)
        if not path.exists():
            return None
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise DistillError(f"cannot read {path}: {error}; fix it or start over with --force") from None
        if not isinstance(value, dict):
            raise DistillError(f"{path} is not a JSON object; start over with --force")
        return value

    def write_json(self, name: str, value: Mapping[str, Any]) -> None:
        """Write atomically: a temporary file renamed over the old one."""
        path = self.file(name)
        temporary = path.with_name(f".{name}.tmp")
        temporary.write_text(json.dumps(value, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, path)

    def read_jsonl(self, name: str) -> list[dict[str, Any]]:
        """All complete rows; a torn last line (no newline, not a full JSON object) is cut off the file."""
        path = self.file(name)
        if not path.exists():
            return []
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        tail = data[end:]
        rows = []
        if tail.strip():
            try:
                row = json.loads(tail)
            except ValueError:
                row = None
            if isinstance(row, dict):
                with path.open("ab") as handle:  # a complete row whose newline was not written
                    handle.write(b"\n")
                end = len(data) + 1
                data += b"\n"
            else:
                print(
                    f"[distill] {name}: dropping a torn last line ({len(tail)} bytes) left by an interrupted run",
                    file=sys.stderr,
                )
        if end < len(data) or (tail and not tail.strip()):
            os.truncate(path, end)
        for number, line in enumerate(data[:end].split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as error:
                raise DistillError(
                    f"{path} line {number} is not valid JSON ({error}); fix it or start over with --force"
                ) from None
            if not isinstance(row, dict):
                raise DistillError(f"{path} line {number} is not a JSON object; fix it or start over with --force")
            rows.append(row)
        return rows

    def append_jsonl(self, name: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append rows as complete lines in one write, then fsync: a kill leaves at most a torn tail."""
        if not rows:
            return
        if name not in self._fds:
            self._fds[name] = os.open(self.file(name), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
        fd = self._fds[name]
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
        os.fsync(fd)
