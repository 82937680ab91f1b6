"""Nodes with their own network namespace and address, for the tests and the benchmarks: a `Lab`.

A lab is a private LAN: a bridge in a namespace of its own (nothing is added to the machine's own namespace), one
namespace per member (Redis, the OSS server, the producers, each node) joined to the bridge by a veth pair, `lo` up,
an address in a /24 of 10.0.0.0/8 drawn per run. Every name starts with the run's prefix `wfn<pid>x<hex>`: parallel
runs never collide, and a crashed run's leftovers are removed by the next lab, but only once their owner pid is dead.
Processes run inside a member (`ip netns exec`); the calling thread can enter one (`Lab.entered`) to open its own
sockets there. A partition is a link set down inside the member (`cut` / `heal`); the archive's line is shaped in
the kernel (`shape`: `tc` htb, its rate as the class's rate and ceiling). `netem` is not in this kernel: a
per-request delay stays in the OSS server's own link emulation (ossserver/link.py). Everything is torn down at
`stop` (context manager, atexit, SIGTERM).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fleetctl.localfleet import alive
from tasks.settings import FleetSettings

from .support import REPO, WorkerProc, child_env

NETNS_DIR = Path("/var/run/netns")
OWNED = re.compile(r"^wfn(?P<pid>\d+)x[0-9a-f]{4}-")
"""The names a lab makes: `wfn<owner pid>x<4 hex>-<member>`; nothing else is ever removed."""
CLONE_NEWNET = 0x40000000
DEV = "eth0"
UNAVAILABLE = "network namespaces are not available on this machine ({why}): the netns tests and `python -m bench " \
              "netfleet` need root and iproute2 (`ip netns add`)"


class LabError(RuntimeError):
    pass


def ip(*args: str, check: bool = True) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def unavailable() -> str | None:
    """None when this machine can make network namespaces, else the one line that says why not."""
    if shutil.which("ip") is None:
        return UNAVAILABLE.format(why="`ip` (iproute2) is not installed")
    probe = f"wfn{os.getpid()}x{secrets.token_hex(2)}-probe"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        return UNAVAILABLE.format(why=f"`ip netns add` said: {done.stderr.strip() or done.returncode}")
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


def owned_namespaces() -> list[str]:
    return [name for name in (line.split()[0] for line in ip("netns", "list").splitlines() if line.strip())
            if OWNED.match(name)]


def reap_leftovers() -> list[str]:
    """Remove the namespaces of labs whose owner process is dead (a crashed run); a live owner's are kept."""
    removed = []
    for name in owned_namespaces():
        if not alive(int(OWNED.match(name)["pid"])):
            ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


@contextmanager
def _thread_in(path: str) -> Iterator[None]:
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _setns(path)
        try:
            yield
        finally:
            if _libc.setns(here, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "could not return to the namespace the thread came from")
    finally:
        os.close(here)


def wait_tcp(host: str, port: int, timeout: float = 30.0) -> None:
    """Wait until something accepts on host:port, as seen from the calling thread's namespace."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.3)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise LabError(f"nothing accepts on {host}:{port} after {timeout:.0f} s")


@dataclass
class Member:
    name: str
    ns: str
    address: str
    bridge_port: str  # its veth's end in the bridge's namespace


@dataclass
class Lab:
    """A private LAN of namespaces. `with Lab() as lab: lab.add("redis") …`; everything goes at exit."""

    prefix: str = field(default_factory=lambda: f"wfn{os.getpid()}x{secrets.token_hex(2)}")
    subnet: str = field(default_factory=lambda: f"10.{random.randint(64, 254)}.{random.randint(0, 255)}")
    members: dict[str, Member] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)
    started: bool = False
    home_fd: int = -1  # the namespace of the thread that started the lab

    @property
    def bridge_ns(self) -> str:
        return f"{self.prefix}-br"

    def start(self) -> Lab:
        why = unavailable()
        if why:
            raise LabError(why)
        reap_leftovers()
        self.home_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        atexit.register(self.stop)
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through `with` blocks and atexit
        ip("netns", "add", self.bridge_ns)
        self.started = True
        ip("-n", self.bridge_ns, "link", "set", "lo", "up")
        ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        return self

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add(self, name: str) -> Member:
        """A new member: its namespace, a veth pair to the bridge, the next address, `lo` and the link up."""
        if not re.fullmatch(r"[a-z][a-z0-9-]{0,23}", name) or name in self.members:
            raise LabError(f"member name {name!r}: lower-case letters, digits and '-', unique in the lab")
        index = len(self.members) + 1
        member = Member(name, f"{self.prefix}-{name}", f"{self.subnet}.{index}", f"v{index}")
        ip("netns", "add", member.ns)
        self.members[name] = member
        ip("-n", self.bridge_ns, "link", "add", member.bridge_port, "type", "veth", "peer", "name", DEV,
           "netns", member.ns)
        ip("-n", self.bridge_ns, "link", "set", member.bridge_port, "master", "br0", "up")
        ip("-n", member.ns, "addr", "add", f"{member.address}/24", "dev", DEV)
        ip("-n", member.ns, "link", "set", "lo", "up")
        ip("-n", member.ns, "link", "set", DEV, "up")
        return member

    def address(self, name: str) -> str:
        return self.members[name].address

    # -- faults and the line
    def cut(self, name: str) -> None:
        """A partition: the member's link goes down; it keeps running, and reaches nobody, as nobody reaches it."""
        ip("-n", self.members[name].ns, "link", "set", DEV, "down")

    def heal(self, name: str) -> None:
        ip("-n", self.members[name].ns, "link", "set", DEV, "up")

    def is_cut(self, name: str) -> bool:
        return "state DOWN" in ip("-n", self.members[name].ns, "link", "show", DEV)

    def shape(self, name: str, rate_mbit: float) -> None:
        """The member's line at `rate_mbit` both ways, in the kernel: an htb class (rate = ceil) on its link's egress
        and on its bridge port's egress (what flows to it)."""
        member = self.members[name]
        for ns, dev in ((member.ns, DEV), (self.bridge_ns, member.bridge_port)):
            self.tc(ns, "qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb", "default", "10", "r2q", "1000")
            self.tc(ns, "class", "replace", "dev", dev, "parent", "1:", "classid", "1:10", "htb",
                    "rate", f"{rate_mbit}mbit", "ceil", f"{rate_mbit}mbit")

    def sent_bytes(self, name: str) -> int:
        """Bytes the member's link has sent (the kernel's interface counter: frames, headers included)."""
        import json

        return int(json.loads(ip("-n", self.members[name].ns, "-j", "-s", "link", "show", "dev", DEV))[0]
                   ["stats64"]["tx"]["bytes"])

    @staticmethod
    def tc(ns: str, *args: str) -> str:
        done = subprocess.run(["ip", "netns", "exec", ns, "tc", *args], capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise LabError(f"tc {' '.join(args)} in {ns}: {done.stderr.strip()}")
        return done.stdout

    # -- processes and sockets inside a member
    def popen(self, name: str, argv: list[str], log: Path, **kwargs: object) -> subprocess.Popen:
        """`argv` inside the member's namespace (`ip netns exec` execs it: the pid is the program's), own session."""
        log.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(["ip", "netns", "exec", self.members[name].ns, *argv], stdout=open(log, "ab"),
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                **kwargs)
        self.procs.append(proc)
        return proc

    @contextmanager
    def entered(self, name: str) -> Iterator[Member]:
        """The calling thread in the member's namespace: the sockets it opens meanwhile live there (and keep working
        after it leaves), as do the threads and processes it starts."""
        with _thread_in(str(NETNS_DIR / self.members[name].ns)):
            yield self.members[name]

    @contextmanager
    def outside(self) -> Iterator[None]:
        """The calling thread back in the namespace the lab was started from (the machine's own, usually)."""
        with _thread_in(f"/proc/{os.getpid()}/fd/{self.home_fd}"):
            yield

    def stop(self) -> None:
        """Stop every process started here, then remove every namespace (members, then the bridge)."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self.procs.clear()
        if not self.started:
            return
        for member in list(self.members.values()):
            ip("netns", "del", member.ns, check=False)
        ip("netns", "del", self.bridge_ns, check=False)
        os.close(self.home_fd)
        self.members.clear()
        self.started = False


# -- the fleet's parts, each in its member ------------------------------------------------------------------------


@dataclass
class NsRedis:
    """A redis-server of our own inside a member, bound to its address (no password: the lab's LAN is private)."""

    lab: Lab
    member: str
    dir: Path
    port: int = 6379
    extra: tuple[str, ...] = ()
    proc: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return self.lab.address(self.member)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def argv(self) -> list[str]:
        return [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", self.host,
                "127.0.0.1", "--protected-mode", "no", "--dir", str(self.dir), "--save", "", "--appendonly", "yes",
                "--appendfsync", "always", *self.extra]

    def start(self) -> NsRedis:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = self.lab.popen(self.member, self.argv(), self.dir / "redis.log")
        return self

    def client(self):  # noqa: ANN201 - redis.Redis, opened from the calling thread's namespace
        import redis

        return redis.Redis(host=self.host, port=self.port, socket_timeout=5, socket_connect_timeout=2)


@dataclass
class NsOss:
    """The project's OSS dev server as its own process inside a member (`python -m ossserver`), per-request delay in
    its link emulation; the line's rate is the kernel's (`Lab.shape`)."""

    lab: Lab
    member: str
    dir: Path
    access_key_id: str
    access_key_secret: str
    delay_ms: float = 0.0
    port: int = 9000
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.lab.address(self.member)}:{self.port}"

    def start(self, buckets: tuple[str, ...] = ("models",)) -> NsOss:
        argv = [sys.executable, "-m", "ossserver", "--root", str(self.dir / "data"), "--host",
                self.lab.address(self.member), "--port", str(self.port), "--access-key-id", self.access_key_id,
                "--link-delay-ms", str(self.delay_ms)]
        for bucket in buckets:
            argv += ["--bucket", bucket]
        env = {**os.environ, "OSS_SERVER_ACCESS_KEY_SECRET": self.access_key_secret,
               "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = self.lab.popen(self.member, argv, self.dir / "oss.log", env=env, cwd=REPO)
        return self


def start_node_process(lab: Lab, member: str, settings: FleetSettings, argv: list[str], name: str, logdir: Path,
                       log_name: str | None = None, **env: str) -> WorkerProc:
    """`warmfleet <argv>` (a worker, a maintenance worker) inside a node's namespace, with the test fleet's
    environment (tests/support.py child_env)."""
    log = logdir / f"{log_name or name}.log"
    proc = lab.popen(member, [sys.executable, "-m", "fleetctl.cli", *argv], log, env=child_env(settings, **env),
                     cwd=REPO)
    return WorkerProc(name, [a for i, a in enumerate(argv) if i and argv[i - 1] == "--release"], proc, log)


def start_node_worker(lab: Lab, member: str, settings: FleetSettings, releases: list[str], name: str, logdir: Path,
                      **env: str) -> WorkerProc:
    """A GPU worker (`warmfleet worker`) in a node's namespace; wait for it with tests.support.wait_warm from a
    thread inside the lab."""
    argv = ["worker", "--name", name]
    for release in releases:
        argv += ["--release", release]
    return start_node_process(lab, member, settings, argv, name, logdir, log_name=f"{name}@{member}", **env)
