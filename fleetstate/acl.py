"""Least privilege: the fleet's roles as Redis ACL users, each with the commands, keys and channels its job needs.

    producer     enqueue `generate` on release queues (kombu's push through the outbox script), read results and the
                 route table and catalog; nothing else: no route, lease, registry or pin writes, no admin commands
    worker       a GPU worker: consume its queues, claim and complete jobs, heartbeat in the warm registry, write
                 results; routes, pins and the catalog read-only
    maintenance  the maintenance worker and beat: sync, audit, retention, the catalog, fleet-wide runs
    operator     the CLI of an operator: routes, pins, queue moves, retire, dead jobs; no admin commands
    monitoring   read-only (Prometheus exporter, `warmfleet status`)

`apply_roles` creates them on a server (ACL SETUSER, by a user allowed to: the local fleet's admin, a deployment's
bootstrap job); `role_url` builds each role's URL. The default user stays the admin: `warmfleet up` keeps its
password in the 0600 state file and gives it to no fleet process. A command a role may not run answers NOPERM;
`denied_message` turns that into one line naming the role.

Workers and maintenance may write only the key families listed here (Redis ACLs cannot say "all but the routes"):
a new family of keys needs its line below, or its writes are refused. tests/test_api_fleet.py runs a fleet in which
every process uses its own role and fails on any refusal in the server's ACL LOG, naming the key.
"""

from __future__ import annotations

import secrets
from urllib.parse import quote, urlsplit, urlunsplit

ROLES = ("producer", "worker", "maintenance", "operator", "monitoring")
USER_PREFIX = "fleet-"

# every connection: log in, choose the database, name the client, ping
_CONNECTION = ["+@connection", "-client", "+client|setname", "+client|id", "+client|getname",
               "+select", "+info"]
_READ = ["+get", "+mget", "+exists", "+type", "+ttl", "+pttl", "+hget", "+hgetall", "+hmget", "+hexists", "+hlen",
         "+hkeys", "+hvals", "+smembers", "+sismember", "+smismember", "+scard", "+lrange", "+llen", "+lindex",
         "+zrange", "+zrangebyscore", "+zcard", "+zscore", "+xrange", "+xrevrange", "+xlen", "+scan", "+hscan",
         "+sscan", "+zscan"]
_PUBSUB_READ = ["+subscribe", "+unsubscribe", "+psubscribe", "+punsubscribe", "+ping"]

# keys a release queue occupies: kombu's lists (`release.<release>` and its priority steps)
_QUEUES = "release.*"
# kombu's bindings of exchanges to queues; its event exchange's fanout channels (`/<db>.celeryev/<routing key>`)
_KOMBU_BINDINGS = "_kombu.binding*"
_EVENT_CHANNELS = "/*.celeryev/*"

RULES: dict[str, list[str]] = {
    "producer": [
        *_CONNECTION, "+get", "+mget", "+exists", "+hget", "+hgetall", "+hmget", "+smembers", "+sismember", "+scard",
        *_PUBSUB_READ, "+publish", "+multi", "+exec", "+sadd",
        "%R~fleet:route:*", "%R~fleet:routes", "%R~fleet:catalog:*", "%R~celery-task-meta-*", "~" + _KOMBU_BINDINGS,
        "&celery-task-meta-*", "&fleet:routes:changed", "&fleet:catalog:changed", "&" + _EVENT_CHANNELS,
        # a selector: kombu's push and the outbox script (fleetstate/lua/outbox_enqueue.lua) with what it calls, on
        # the queue lists and the outbox only; none of them reads a message back
        "(+lpush +llen +pexpire +evalsha +eval +script|load +script|exists +time +hset +zadd "
        "~" + _QUEUES + " ~fleet:outbox ~fleet:outbox:at ~fleet:outbox:queues +sadd)",
    ],
    "worker": [
        "+@all", "-@dangerous", "+info", "+client|setname", "+client|id", "-flushdb", "-flushall",
        "~release.*", "~node.*", "~fleet.*", "~celery*", "~_kombu.*", "~*.celery.pidbox*", "~unacked*", "~fleet:warm:*", "~fleet:worker:*",
        "~fleet:lease:*", "~fleet:job:*", "~fleet:outbox*", "~fleet:deliveries", "~fleet:stats", "~fleet:l2:*",
        "~fleet:registry:*",
        "~fleet:nodes", "~fleet:peers*", "~fleet:origin:*", "~fleet:lock:*", "~fleet:fanout:*", "~fleet:dead",
        "~fleet:live-warm", "~fleet:alerts", "~fleet:release-meta:*", "~fleet:breaker*", "~fleet:jobstats*",
        "~fleet:catalog*",  # a worker's boot lists the archive into the catalog
        "%R~fleet:route:*", "%R~fleet:routes*", "%R~fleet:pins", "%R~fleet:canary*",
        "&*",
    ],
    "maintenance": [
        "+@all", "-@dangerous", "+info", "+client|setname", "+client|id", "-flushdb", "-flushall",
        "~release.*", "~node.*", "~fleet.*", "~celery*", "~_kombu.*", "~*.celery.pidbox*", "~unacked*", "~fleet:warm:*", "~fleet:worker:*",
        "~fleet:lease:*", "~fleet:job:*", "~fleet:outbox*", "~fleet:deliveries", "~fleet:stats", "~fleet:l2:*",
        "~fleet:registry:*",
        "~fleet:nodes", "~fleet:peers*", "~fleet:origin:*", "~fleet:lock:*", "~fleet:fanout:*", "~fleet:dead",
        "~fleet:live-warm", "~fleet:alerts", "~fleet:release-meta:*", "~fleet:catalog*", "~fleet:breaker*",
        "~fleet:jobstats*", "~fleet:canary*",
        # beat's canary analysis (warmfleet.canary_tick, fleetstate/canary.py) steps a canary up or rolls it back
        "~fleet:route:*", "~fleet:routes*", "%R~fleet:pins",
        "&*",
    ],
    "operator": ["+@all", "-@dangerous", "+info", "+client|setname", "+client|id",
                 "-flushdb", "-flushall", "~*", "&*"],
    # read-only, but for the exporter's alert states (fleetctl/metrics.py evaluates the alerts it serves)
    "monitoring": [*_CONNECTION, *_READ, *_PUBSUB_READ, "%R~*", "&*", "(+hset +hdel +del ~fleet:alerts)"],
}


class UnknownRole(ValueError):
    pass


def user_of(role: str) -> str:
    if role not in RULES:
        raise UnknownRole(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    return USER_PREFIX + role


def role_of_user(user: str | None) -> str | None:
    return user[len(USER_PREFIX):] if user and user.startswith(USER_PREFIX) else None


def new_passwords() -> dict[str, str]:
    return {role: secrets.token_urlsafe(24) for role in ROLES}


def apply_roles(client, passwords: dict[str, str]) -> None:  # noqa: ANN001 - redis.Redis of a user allowed ACL
    """Create (or reset) each role's user with its password and rules."""
    for role, password in passwords.items():
        client.execute_command("ACL", "SETUSER", user_of(role), "reset", "on", f">{password}", "resetkeys",
                               "resetchannels", "-@all", *RULES[role])


def config_lines(passwords: dict[str, str]) -> list[str]:
    """The roles as `user` directives of a redis.conf: they survive a restart of the server (ACL SETUSER does not
    unless the server has an ACL file)."""
    def arg(rule: str) -> str:
        return f'"{rule}"' if " " in rule else rule

    return [" ".join(["user", user_of(role), "reset", "on", f">{password}", "resetkeys", "resetchannels", "-@all",
                      *(arg(r) for r in RULES[role])]) for role, password in passwords.items()]


def role_urls(url: str, passwords: dict[str, str]) -> dict[str, str]:
    return {role: role_url(url, role, password) for role, password in passwords.items()}


def create_roles(admin_url: str) -> dict[str, str]:
    """Create every role on the server `admin_url` reaches (as a user allowed ACL SETUSER) with fresh passwords:
    role → its URL."""
    from .client import redis_client

    passwords = new_passwords()
    client = redis_client(admin_url)
    try:
        apply_roles(client, passwords)
    finally:
        client.close()
    return {role: role_url(admin_url, role, password) for role, password in passwords.items()}


PROCESS_ROLES = {"worker": "worker", "maintenance": "maintenance", "beat": "maintenance", "metrics": "monitoring",
                 "flower": "operator", "api": "producer"}
"""The role each process of a fleet logs in as (its name in the local fleet, workers by prefix)."""


def role_url(url: str, role: str, password: str) -> str:
    """`url` (any redis:// or rediss:// URL of the server) with the role's user and password instead of its own."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{quote(user_of(role), safe='')}:{quote(password, safe='')}@{host}"))


def url_role(url: str | None) -> str | None:
    """The role a URL logs in as (None: the default user, or no URL)."""
    if not url:
        return None
    try:
        return role_of_user(urlsplit(url).username)
    except ValueError:
        return None


def denied_message(exc: BaseException, url: str | None) -> str | None:
    """One line for a command the role may not run (Redis's NOPERM, which redis-py raises as NoPermissionError and
    kombu re-raises as its OperationalError with the same text), or None when `exc` is no such refusal."""
    text = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
    if "NOPERM" not in text and "no permissions" not in text:
        return None
    role = url_role(url) or "this user"
    reason = text.split("NOPERM", 1)[-1].strip().rstrip(".")
    return f"refused: the {role} role may not do this ({reason})"
