"""The local fleet's own redis-server: its configuration, waiting until it is ready (not just listening), compacting
its AOF before it stops, and telling a process by its start time (a reused pid is not ours)."""

from __future__ import annotations

import os
import time
from pathlib import Path


class RedisNotReady(RuntimeError):
    """The local redis-server exited while starting, or did not finish loading its data set in time."""


def start_time(pid: int) -> float | None:
    """When a process started, in clock ticks since boot (/proc/<pid>/stat field 22); None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return float(fh.read().rsplit(") ", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


REDIS_READY_SECONDS = 600.0
"""How long `up` waits for Redis to load its data set (an AOF of a few hundred MB loads in about a minute)."""


def wait_redis(url: str, proc=None, timeout: float = REDIS_READY_SECONDS) -> None:  # noqa: ANN001 - a Proc
    """Wait until Redis answers PING: listening is not enough, a server loading its data set answers LOADING."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.ping()
            return
        except redis.BusyLoadingError:
            reason = "still loading its data set"
        except redis.ConnectionError as exc:
            reason = str(exc)
        finally:
            client.close()
        if proc is not None and not proc.alive():
            raise RedisNotReady(f"redis-server exited while starting; see {proc.log}")
        if time.monotonic() > deadline:
            where = proc.log if proc is not None else "its log"
            raise RedisNotReady(f"redis-server not ready after {timeout:.0f}s ({reason}); see {where}")
        time.sleep(0.1)


def redis_config(folder: Path, port: int, password: str, tls: Path | None = None, users: list[str] = ()) -> Path:
    """The local redis-server's configuration, password included, in a file only this user can read: never argv,
    which every local user sees in `ps`."""
    path = folder / "redis.conf"
    # the AOF is rewritten whenever it doubles past 8 MB (Redis's default waits for 64 MB), and `down` compacts it
    # too: a long-lived local fleet's AOF stays near the size of its data, which `up` loads in seconds
    lines = [f"port {port}", "bind 127.0.0.1", f'dir "{folder}"', 'save ""', "appendonly yes", "protected-mode yes",
             "auto-aof-rewrite-percentage 100", "auto-aof-rewrite-min-size 8mb", "aof-use-rdb-preamble yes",
             f"requirepass {password}"]
    lines += users  # the fleet's roles (fleetstate/acl.py config_lines): here, they survive a restart
    if tls is not None:  # TLS only: no plain-text port; clients verify the server, the password authenticates them
        lines[0] = "port 0"
        lines += [f"tls-port {port}", f'tls-cert-file "{tls / "server.pem"}"', f'tls-key-file "{tls / "server.key"}"',
                  f'tls-ca-cert-file "{tls / "ca.pem"}"', "tls-auth-clients no"]
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def compact_aof(url: str, log, timeout: float = 120.0) -> None:  # noqa: ANN001 - log: print-like
    """Rewrite the AOF before Redis stops (BGREWRITEAOF, waited for): `up` then loads a compact file, not every
    command since the last rewrite. Best effort: a Redis that cannot do it now stops as it is."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=10)
        try:
            client.bgrewriteaof()
        except redis.ResponseError:
            pass  # one is running already: wait for it
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = client.info("persistence")
            if not info.get("aof_rewrite_in_progress") and not info.get("aof_rewrite_scheduled"):
                return
            time.sleep(0.1)
        log(f"redis: the AOF rewrite did not finish in {timeout:.0f}s; stopping it as it is")
    except redis.RedisError:
        pass
