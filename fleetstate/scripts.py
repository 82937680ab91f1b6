"""The fleet's Redis scripts, in one place: one `.lua` file each in fleetstate/lua/ (shipped as package data), loaded
once and run with redis-py's `register_script` (EVALSHA; a server that lacks the script, after a restart or a
failover, is sent it once).

Each file says what it does, its KEYS and ARGV, and what it returns; the Python module named in its first line is
the one that calls it.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis


class Lua:
    """One script of fleetstate/lua/, callable on any client: `SCRIPT(client, keys, args)`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.text = (resources.files(__package__) / "lua" / f"{name}.lua").read_text(encoding="utf-8")
        self._script: Any = None

    def __call__(self, client: redis.Redis, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        script = self._script
        if script is None:  # the SHA is the same for every client: one registration serves them all
            script = self._script = client.register_script(self.text)
        return script(keys=list(keys), args=list(args), client=client)

    def eval_args(self, keys: Sequence[Any], args: Sequence[Any]) -> tuple[Any, ...]:
        """EVAL's arguments for a caller that queues the command itself (a pipeline, kombu's publish batch): the
        script's text travels with it, so no SCRIPT EXISTS / LOAD round trip precedes the pipeline."""
        return (self.text, len(keys), *keys, *args)

    def __repr__(self) -> str:
        return f"Lua({self.name!r})"


TOKEN_LOCK = Lua("token_lock")
"""Release, extend or take back a key held by a token: the run locks, the origin leases and the job leases."""
LEASE_CLAIM = Lua("lease_claim")
LEASE_COMPLETE = Lua("lease_complete")
LEASE_LEAVE = Lua("lease_leave")
OUTBOX_ENQUEUE = Lua("outbox_enqueue")
OUTBOX_RESEND = Lua("outbox_resend")
ORPHAN_RESTORE = Lua("orphan_restore")
QUEUE_MOVE = Lua("queue_move")
FANOUT_MARK = Lua("fanout_mark")


def release_token(client: redis.Redis, key: str, token: str) -> int:
    """Delete `key` if `token` holds it: 1, else 0."""
    return int(TOKEN_LOCK(client, [key], [token, "", ""]))


def extend_token(client: redis.Redis, key: str, token: str, ttl_ms: int, take_back: bool = False) -> int:
    """Set `key`'s expiry to `ttl_ms` if `token` holds it (1); with `take_back`, take it again when it expired and
    nobody took it (2); else 0."""
    return int(TOKEN_LOCK(client, [key], [token, int(ttl_ms), "1" if take_back else ""]))
