"""Shared fixtures. Integration fixtures start real processes on private ports under temp folders."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
for _key in [k for k in os.environ if k.startswith("FLEET_")]:
    del os.environ[_key]  # tests never pick up an operator's configuration

from cachemgr import LocalArchive  # noqa: E402
from fleetctl.demo.builders import DEMO_RELEASES, RANDOM_DEMO_VERSIONS, publish_demo  # noqa: E402
from tasks.settings import FleetSettings  # noqa: E402

from .layers import FAST, LAYERS, ORDER, SHARED_FLEET, layer_of, schedule_rank, work_unit_of  # noqa: E402
from .support import OSS_AK, OSS_SK, REPO, RedisServer, fleet_settings_for, start_worker, wait_warm  # noqa: E402

pytest_plugins = ["pytester"]  # tests/test_layers.py runs a small suite of its own to show the layer rule failing


# -- layers (tests/layers.py) ------------------------------------------------------------------------------------


class LayerError(RuntimeError):
    """A test of a fast layer (unit, pipeline) started a Python process."""


_RUNNING: list[tuple[str, str]] = []
"""(module, layer) of the test whose setup, call or teardown runs now; empty between tests."""


def _python_program(args: tuple) -> str | None:
    """The program of a `subprocess.Popen` audit event when it is a Python interpreter (a worker, the CLI, a server)."""
    executable, argv = args[0], args[1]
    if isinstance(argv, (str, bytes)):
        argv = [argv]
    program = os.fsdecode(executable or (argv[0] if argv else ""))
    name = os.path.basename(program.split()[0] if program else "")
    if program == sys.executable or name.startswith("python"):
        return " ".join(os.fsdecode(a) for a in list(argv)[:4])
    return None


def _layer_guard(event: str, args: tuple) -> None:
    if not _RUNNING or _RUNNING[-1][1] not in FAST:
        return
    module, layer = _RUNNING[-1]
    started = None
    if event == "subprocess.Popen":
        started = _python_program(args)
    elif event in ("os.fork", "os.forkpty"):
        started = "a forked copy of this interpreter"
    if started:
        raise LayerError(f"tests/{module}.py is in the fast layer {layer!r} but started a Python process ({started}): "
                         "fast layers run everything in-process; list the module under 'fleet' or 'fault' in "
                         "tests/layers.py")


sys.addaudithook(_layer_guard)


def item_layer(item: pytest.Item) -> str | None:
    """A test's layer: its module's (tests/layers.py), unless the test itself is marked with another layer (a test
    that starts a process inside a module of the fast layers)."""
    own = [m.name for m in getattr(item, "own_markers", []) if m.name in ORDER]
    return own[0] if own else layer_of(item.path.stem)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each test gets its layer as a marker (`-m unit`, `-m "unit or pipeline"`); a module in no layer is refused,
    so a new test file is placed on purpose."""
    unplaced = sorted({item.path.stem for item in items if layer_of(item.path.stem) is None})
    if unplaced:
        raise pytest.UsageError(f"{', '.join(unplaced)} in no layer: list each in tests/layers.py "
                                f"({', '.join(ORDER)})")
    for item in items:
        layer = item_layer(item) or ""
        item.add_marker(getattr(pytest.mark, layer))
        item.stash[_LAYER] = layer
    # The slowest layers first (fault, fleet, then pipeline, unit), and within a layer the modules in the order
    # tests/layers.py lists them (the longest first): with `-n 3` the long modules start at once and the short ones
    # fill in behind them (the scheduler below keeps this order).
    items.sort(key=lambda item: schedule_rank(item.path.stem))


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`--dist loadfile` (the whole suite's): xdist's file scheduling, with two changes — the modules of
    tests/layers.py's SHARED_FLEET are one work unit (one process, so they share one fleet), and work units are
    handed out in collection order (xdist would reorder them by test count, putting the long few-test modules last)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ModuleScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return work_unit_of(Path(scope).stem, scope)

    config.option.loadscopereorder = False
    return ModuleScheduling(config, log)


_LAYER = pytest.StashKey[str]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    _RUNNING.append((item.path.stem, item.stash.get(_LAYER, "")))
    try:
        yield
    finally:
        _RUNNING.pop()


assert set(LAYERS) == set(ORDER)


DEMO_SOURCES = ("fleetctl/demo", "workers/models", "cachemgr", "requirements/dev.txt")
"""What the demo archive's bytes follow from: its builders and weights, the model families, publish, the lock."""


def _demo_sources_key() -> str:
    digest = hashlib.sha256()
    for base in DEMO_SOURCES:
        path = REPO / base
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file() and "__pycache__" not in file.parts:
                digest.update(str(file.relative_to(REPO)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(root)).encode() + b"\0" + hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


@pytest.fixture(scope="session")
def demo_archive_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo models published into a local archive: built once per change of their sources and kept in a cache
    (~/.cache/warmfleet-tests, or $WARMFLEET_TEST_CACHE) keyed by a hash of those sources, then used by every
    session. A cached archive whose bytes differ from what was built (a test wrote into it) is built again. Archives
    of other sources are removed once unused for a day (another checkout's session may be using one now)."""
    from filelock import FileLock

    cache = Path(os.environ.get("WARMFLEET_TEST_CACHE") or Path.home() / ".cache" / "warmfleet-tests")
    cache.mkdir(parents=True, exist_ok=True)
    key = _demo_sources_key()
    root, stamp = cache / f"demo-archive-{key}", cache / f"demo-archive-{key}.sha256"
    with FileLock(str(cache / "demo-archive.lock")):
        for old in cache.glob("demo-archive-*"):  # archives of other sources unused for a day
            if key not in old.name and not old.name.endswith(".lock") and time.time() - old.stat().st_mtime > 86400:
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        if root.is_dir() and stamp.is_file() and stamp.read_text() == _tree_digest(root):
            os.utime(root)
            return root
        shutil.rmtree(root, ignore_errors=True)
        build = Path(tempfile.mkdtemp(prefix="build-", dir=cache))
        try:
            publish_demo(LocalArchive(build / "archive"), build / "work", versions=RANDOM_DEMO_VERSIONS,
                         log=lambda *_: None)
            os.replace(build / "archive", root)
        finally:
            shutil.rmtree(build, ignore_errors=True)
        stamp.write_text(_tree_digest(root))
    return root


@pytest.fixture
def archive_copy(demo_archive_dir: Path, tmp_path: Path) -> LocalArchive:
    """A private copy of the demo archive that a test may change."""
    dest = tmp_path / "archive"
    shutil.copytree(demo_archive_dir, dest)
    return LocalArchive(dest)


@dataclass
class SharedFleet:
    redis: RedisServer
    settings: FleetSettings
    workers: dict


def _shares_fleet(request: pytest.FixtureRequest) -> bool:
    """Whether the requesting module is one of tests/layers.py's SHARED_FLEET (it uses `shared_fleet`'s fleet)."""
    return Path(request.node.path).stem in SHARED_FLEET


def _start_two_workers(settings: FleetSettings, logs: Path) -> dict:
    """Two warm workers, one per demo release, and a route to the newer release (the older one below it)."""
    import redis

    from fleetstate.routes import RouteTable

    old, new = DEMO_RELEASES
    workers = [start_worker(settings, [old], "w-old", logs, wait=False),
               start_worker(settings, [new], "w-new", logs, wait=False)]
    try:
        for w in workers:
            wait_warm(settings, w)
    except BaseException:
        for w in workers:
            w.stop()
        raise
    table = RouteTable(redis.Redis.from_url(settings.broker_url))
    table.set_active(old, actor="test")
    table.set_active(new, actor="test")
    return {"old": workers[0], "new": workers[1], "releases": (old, new)}


def _stop_workers(fleet: dict) -> None:
    for w in (fleet["old"], fleet["new"]):
        w.stop()


@pytest.fixture(scope="session")
def shared_fleet(demo_archive_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One redis-server, settings and pair of warm workers per test process for the modules of tests/layers.py's
    SHARED_FLEET, instead of one per module (their module fixtures `redis_server`, `fleet_settings` and
    `two_workers` hand out this fleet's)."""
    server = RedisServer(tmp_path_factory.mktemp("shared-redis")).start()
    try:
        settings = fleet_settings_for(tmp_path_factory.mktemp("shared-home"), server.url, demo_archive_dir)
        fleet = SharedFleet(server, settings, _start_two_workers(settings, tmp_path_factory.mktemp("shared-logs")))
    except BaseException:
        server.stop()
        raise
    yield fleet
    _stop_workers(fleet.workers)
    server.stop()


@pytest.fixture(scope="module")
def redis_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    if _shares_fleet(request):
        yield request.getfixturevalue("shared_fleet").redis
        return
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fleet_settings(request: pytest.FixtureRequest, redis_server: RedisServer, demo_archive_dir: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> FleetSettings:
    if _shares_fleet(request):
        return request.getfixturevalue("shared_fleet").settings
    return fleet_settings_for(tmp_path_factory.mktemp("home"), redis_server.url, demo_archive_dir)


@pytest.fixture(scope="module")
def producer(fleet_settings: FleetSettings):
    """The producer side: the `tasks` app pointed at the private broker."""
    import tasks

    tasks.configure(fleet_settings)
    yield tasks
    tasks.app.pool.force_close_all()


@pytest.fixture(scope="module")
def two_workers(request: pytest.FixtureRequest, fleet_settings: FleetSettings, producer,
                tmp_path_factory: pytest.TempPathFactory):
    """Two warm workers, one per demo release, and a route to the newer release: the module's own, or the shared
    fleet's for a SHARED_FLEET module (whose route it must leave as it found it: checked after the module)."""
    if _shares_fleet(request):
        fleet = request.getfixturevalue("shared_fleet")
        yield fleet.workers
        _assert_left_as_found(fleet)
        return
    fleet = _start_two_workers(fleet_settings, tmp_path_factory.mktemp("logs"))
    yield fleet
    _stop_workers(fleet)


def _assert_left_as_found(fleet: SharedFleet) -> None:
    """A module that shares the fleet left it as it found it: the newer release active over the older, no canary, no
    job left queued."""
    import redis

    from cachemgr import Release
    from fleetstate.routes import RouteTable

    old, new = fleet.workers["releases"]
    model = Release.parse(new).model
    client = redis.Redis.from_url(fleet.settings.broker_url)
    route = RouteTable(client).get(model)
    assert (route.active, route.previous, route.canary) == (new, old, None), \
        f"a SHARED_FLEET module changed the shared fleet's route: {route}"
    left = {key.decode(): client.llen(key) for key in client.keys("release.*") if client.type(key) == b"list"}
    assert not any(left.values()), f"a SHARED_FLEET module left jobs queued on the shared fleet: {left}"


@pytest.fixture(autouse=True)
def _collect_results_while_redis_is_up(request: pytest.FixtureRequest):
    """AsyncResult.__del__ talks to the result backend: the results of a test that talks to a redis-server (an
    integration test, or one using the `redis_server` fixture) are collected while that server is up, not at
    interpreter exit (where they also trip a CPython 3.11 AST bug inside pytest's import hook)."""
    yield
    if request.node.get_closest_marker("integration") or "redis_server" in request.fixturenames:
        import gc

        gc.collect()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch pinned to one thread for a module, as workers run: the same seed gives the same bytes only at the
    same thread count, so in-process twins of a worker's images need it too."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- the OSS-protocol server (tests/test_ossserver*.py) ---------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """The project's OSS-protocol server for a module, with the keys OSS_AK/OSS_SK (tests/support.py)."""
    from ossserver import OssServer

    with OssServer(tmp_path_factory.mktemp("oss"), access_key_id=OSS_AK, access_key_secret=OSS_SK) as srv:
        yield srv


@pytest.fixture
def bucket_name(server) -> str:
    """A fresh bucket on that server; faults injected by the test are cleared afterwards."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    server.create_bucket(name)
    yield name
    server.clear_faults()


@pytest.fixture
def bucket(server, bucket_name: str):
    """oss2's own client on that bucket."""
    import oss2

    return oss2.Bucket(oss2.Auth(OSS_AK, OSS_SK), server.endpoint, bucket_name)
