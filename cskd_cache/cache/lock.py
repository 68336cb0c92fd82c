"""One writer per cache: an advisory lock file beside the cache (`CACHE.lock`), held while precompute runs.

The operating system holds the lock (fcntl.flock on the open file), so a writer that crashes or is killed
releases it at once and never leaves it stuck; the file also says who holds it (host, pid, process start time,
when, which command), for the refusal message. Where flock is not supported (some network mounts), the file's
content decides: a holder on this host whose process is gone (no such pid, or a pid started at another time) is
stale and taken over. The lock lives beside the cache, not in it, because replacing a cache deletes its folder.
Remote caches (s3://, ...) are not locked: there, one writer per cache is the user's job, and the run id that
every shard marker carries still keeps another run's shards from counting (see store.py).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import sys

from ..errors import CacheError

try:
    import fcntl
except ImportError:  # Windows: the content-based fallback only
    fcntl = None


def _start_time(pid: int) -> str | None:
    """The process's start time (Linux: clock ticks since boot, field 22 of /proc/PID/stat), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # cannot tell from here: assume it is running
    pid = int(holder.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, belongs to someone else
    return holder.get("start_time") is None or _start_time(pid) == holder.get("start_time")


def lock_path(cache_url: str) -> str | None:
    """Where the lock of a cache lives; None for remote caches."""
    if "://" in cache_url and not cache_url.startswith("file://"):
        return None
    return os.path.abspath(cache_url.removeprefix("file://").rstrip("/")) + ".lock"


class WriterLock:
    def __init__(self, cache_url: str):
        self.cache_url, self.path, self.fd = cache_url, lock_path(cache_url), None

    def _holder(self) -> dict:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def _refuse(self, holder: dict) -> None:
        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}"
        raise CacheError(f"--out {self.cache_url} is being written by another precompute ({who}); wait for it to "
                         f"finish or stop it (a crashed writer releases its lock: {self.path})")

    def acquire(self) -> "WriterLock":
        if self.path is None:
            return self
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    self._refuse(self._holder())
                except OSError:  # flock unsupported here: decide by the recorded holder
                    holder = self._holder()
                    if holder and holder.get("pid") != os.getpid() and _alive(holder):
                        self._refuse(holder)
            else:
                holder = self._holder()
                if holder and _alive(holder):
                    self._refuse(holder)
            me = {"host": socket.gethostname(), "pid": os.getpid(), "start_time": _start_time(os.getpid()),
                  "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  "command": " ".join(sys.argv)[:500]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # no holder recorded: the content fallback sees it free
        finally:
            os.close(self.fd)  # closing releases the flock
            self.fd = None

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
