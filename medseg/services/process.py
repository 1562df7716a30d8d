"""Starting, waiting for and stopping the daemons of the local services."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from medseg.errors import ServiceError

log = logging.getLogger(__name__)


def program(name: str, package: str, *folders: str) -> str:
    """The path of an installed program, or a ServiceError that names the Debian package to install."""
    found = shutil.which(name) or next(
        (str(Path(f) / name) for f in folders if (Path(f) / name).is_file()), None)
    if found is None:
        raise ServiceError(f"{name} not found on PATH: install the Debian package {package} "
                           f"(apt-get install {package})")
    return found


def run(cmd: Sequence[str], *, what: str, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    """Run a command to its end; a failure is a ServiceError with its output."""
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise ServiceError(f"{what}: {' '.join(cmd)} did not finish in {timeout:.0f} s") from err
    if proc.returncode != 0:
        raise ServiceError(f"{what}: {' '.join(cmd)} failed ({proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc.stdout


def wait_for(check: Callable[[], bool], *, what: str, timeout: float, log_file: Path | None = None) -> None:
    """Wait until ``check()`` is true; past ``timeout`` a ServiceError with the end of ``log_file``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.2)
    tail = ""
    if log_file is not None and log_file.is_file():
        tail = "; its log ends:\n" + "\n".join(log_file.read_text(errors="replace").splitlines()[-20:])
    raise ServiceError(f"{what} did not come up within {timeout:.0f} s{tail}")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_pid(pid: int | None, *, what: str, timeout: float = 20) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; a process already gone is fine."""
    if pid is None or not alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return
        _reap(pid)
        time.sleep(0.1)
    log.warning("%s (pid %d) did not stop on SIGTERM within %.0f s; killing it", what, pid, timeout)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _reap(pid: int) -> None:
    """Collect a child that has exited, so that it no longer counts as alive."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def record_json(record: object) -> str:
    """A service's record (a dataclass) as JSON, paths as strings."""
    return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(record).items()},
                      indent=1)
