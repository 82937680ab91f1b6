"""Bad input, end to end: malformed jobs sent raw to a live worker, hostile names through the CLI, manifests that lie
or point outside their folder, pickles in the archive, a safetensors header that lies. Each is refused with a clear
message; nothing is written outside the cache (or archive) root; no pickle is ever loaded.

Unit tests of the validators themselves live in test_names.py, test_requests.py and test_manifest.py; here the same
inputs go through sync, publish and the worker.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cachemgr import ChecksumMismatch, LocalArchive, ManifestError, Release, SnapshotStore
from cachemgr.names import ComponentRef, InvalidName, queue_for, validate_component
from cachemgr.sync import sync_ref, sync_release
from fleetctl.cli import main as cli
from fleetctl.demo.builders import DEMO_RELEASES
from fleetstate.registry import WarmRegistry
from tasks.requests import BadRequest, GenerateRequest
from workers.models import LoadError, builder_for, family_of

from .support import start_worker

pytestmark = pytest.mark.integration

NEW = DEMO_RELEASES[1]
BASE = Release.parse(NEW).base
UNET = "unet/diffusion_pytorch_model.safetensors"
SLOW = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def snapshot_tree(root: Path, inside: tuple[Path, ...] = ()) -> dict[str, tuple[int, str]]:
    """Every file under `root` (not following links) with its size and hash, except under the `inside` roots."""
    out = {}
    for path in sorted(root.rglob("*")):
        if any(path.is_relative_to(i) for i in inside) or path.is_dir() and not path.is_symlink():
            continue
        data = path.read_bytes() if path.is_file() and not path.is_symlink() else str(path.readlink()).encode()
        out[str(path.relative_to(root))] = (len(data), hashlib.sha256(data).hexdigest())
    return out


class Marker:
    """Unpickling this creates a file: if the marker ever exists, something loaded a pickle."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


# -- jobs sent raw to a live worker -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker(fleet_settings, producer, tmp_path_factory):
    w = start_worker(fleet_settings, [NEW], "w-bad-input", tmp_path_factory.mktemp("logs"))
    yield w
    w.stop()


LOOKALIKES = ["nano‐banana@base-v1.1.0+lora-v2.3.1",  # U+2010 hyphen
              "nanо-banana@base-v1.1.0",  # Cyrillic о
              "nano-banana@base-v1.1.0\u200b", "../nano-banana@base-v1.1.0", "/etc/passwd@base-v1",
              "nano-banana@base-../../x", "nano-banana@base-v1.1.0/../x", "NANO-BANANA@base-v1.1.0"]
junk = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                 st.text(max_size=20), st.binary(max_size=20), st.lists(st.integers(), max_size=3))
prompts = st.one_of(st.text(max_size=60), st.text(min_size=2001, max_size=2100), st.just(""), st.just("   "),
                    st.binary(max_size=40), st.just("\ud800 lone surrogate"), st.just("nul\x00byte"), junk)
jobs = st.fixed_dictionaries({"prompt": prompts}, optional={
    "steps": st.one_of(st.integers(-5, 1000), junk), "guidance": st.one_of(st.floats(allow_nan=True), junk),
    "width": st.one_of(st.integers(-8, 5000), junk), "height": st.one_of(st.integers(-8, 5000), junk),
    "seed": st.one_of(st.integers(-(2**40), 2**40), junk), "negative_prompt": prompts,
    "release": st.one_of(st.sampled_from(LOOKALIKES), st.just(DEMO_RELEASES[0]), junk),
    "model": st.one_of(st.sampled_from(["../x", "nano-banana", "Nano", "a/b", "ghost"]), junk),
    "unexpected": junk,
})


def cheap(params: dict) -> bool:
    """A job that validates must also be small, so each example costs milliseconds."""
    try:
        request = GenerateRequest.parse(**params)
    except BadRequest:
        return True
    return (request.steps or 4) <= 4 and (request.width or 64) <= 64 and (request.height or 64) <= 64


@pytest.mark.fleet  # starts a Python process: the fleet layer (tests/layers.py)
@SLOW
@given(params=jobs)
def test_any_job_sent_raw_either_serves_or_fails_alone_with_the_validators_reason(producer, worker, params):
    """A producer in another language skips our validation: the worker applies the same rules and answers with
    the same one-line reason, and only that job fails."""
    assume(cheap(params))
    try:
        GenerateRequest.parse(**params)
        expected = None
    except BadRequest as exc:
        expected = str(exc)
    sent = producer.app.send_task("warmfleet.generate", kwargs=params, queue=queue_for(NEW))
    if expected is None and params.get("release") in (None, NEW) and params.get("model") in (None, "nano-banana"):
        assert sent.get(timeout=120)["release"] == NEW
        return
    with pytest.raises(Exception) as failed:
        sent.get(timeout=120)
    assert type(failed.value).__name__ == "BadRequest", failed.value
    if expected is not None:
        assert str(failed.value) == expected


@pytest.mark.fleet  # starts a Python process: the fleet layer (tests/layers.py)
def test_after_all_that_the_worker_still_serves_with_its_one_load(fleet_settings, producer, worker):
    result = producer.generate.delay("still fine", seed=1, release=NEW).get(timeout=120)
    assert result["worker"] == "w-bad-input@testnode" and worker.proc.poll() is None
    registry = WarmRegistry(redis.Redis.from_url(fleet_settings.broker_url))
    state = {w.worker: w for w in registry.workers()}["w-bad-input@testnode"]
    assert state.loads == 1 and state.state == "warm"


# -- hostile names through the CLI ------------------------------------------------------------------------------


NASTY = ["..", "../x", "a/../b", "/etc", "a/b", "a\\b", "nano‐banana", "nanо", "x\x00y", "", " ", "A", "a..b",
         "-a", "a" * 65, "ä", "ﬁ", "v1.0.0/../../..", "~root", "$HOME", "a b"]
names = st.one_of(st.sampled_from(NASTY), st.text(alphabet=st.sampled_from("a./\\-_ä‐0~"), min_size=1, max_size=12))


def invalid(*parts: str) -> bool:
    try:
        for p in parts:
            ComponentRef(p, "base", "v1")
    except (InvalidName, TypeError):
        return True
    return False


def invalid_component(value: str) -> bool:
    try:
        validate_component(value)
    except InvalidName:
        return True
    return False


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A folder holding an archive, an L2 and a home: the names under test may only ever write inside the first two."""
    root = tmp_path_factory.mktemp("sandbox")
    for sub in ("archive", "l2", "home", "folder"):
        (root / sub).mkdir()
    (root / "folder" / "model_index.json").write_text("{}")
    env = {"FLEET_HOME": str(root / "home"), "FLEET_CACHE_ROOT": str(root / "l2"),
           "FLEET_ARCHIVE_URL": (root / "archive").as_uri(), "FLEET_BROKER_URL": ""}
    return root, env


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(model=names, version=names)
def test_hostile_names_are_refused_by_sync_and_publish_and_write_nothing(sandbox, model, version):
    root, env = sandbox
    assume(invalid(model, version))
    before = snapshot_tree(root, inside=(root / "home",))
    runner = CliRunner()
    commands = [["sync", f"--release={model}@base-{version}"],
                ["publish", "--", model, "base", version, str(root / "folder")],
                ["sync", f"--release=nano-banana@base-{version}+lora-{model}"]]
    if invalid_component(model):  # the same hostile text as a component name
        commands.append(["publish", "--", "m", model, "v1", str(root / "folder")])
    for args in commands:
        done = runner.invoke(cli, args, env=env)
        assert done.exit_code != 0, (args, done.output)
        assert done.exception is None or isinstance(done.exception, SystemExit), done.exception
        assert "invalid" in done.output.lower(), (args, done.output)
        assert len([line for line in done.output.splitlines() if line.strip()]) == 1, done.output
    assert snapshot_tree(root, inside=(root / "home",)) == before


def test_publish_refuses_a_folder_holding_a_pickle_and_uploads_nothing(sandbox, tmp_path):
    root, env = sandbox
    folder = tmp_path / "with-pickle"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Marker(tmp_path / "MARKER")))
    before = snapshot_tree(root)
    done = CliRunner().invoke(cli, ["publish", "m", "base", "v1", str(folder)], env=env)
    assert done.exit_code == 1 and "pickled checkpoint" in done.output and "convert it to safetensors" in done.output
    assert snapshot_tree(root) == before and not (tmp_path / "MARKER").exists()


# -- archives that lie ------------------------------------------------------------------------------------------


def raw_version(archive_root: Path, ref: ComponentRef, files: dict[str, bytes], manifest: dict | None = None) -> dict:
    """A version written straight into the archive's folder, with a manifest that says whatever the test wants."""
    folder = archive_root / ref.model / ref.component / ref.version
    folder.mkdir(parents=True)
    entries = []
    for path, data in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
        entries.append({"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    body = manifest or {"model": ref.model, "component": ref.component, "version": ref.version, "files": entries,
                        "meta": {}}
    (folder / "manifest.json").write_text(json.dumps(body))
    return body


REF = ComponentRef("hostile", "base", "v1")
escaping = st.sampled_from(["../escape.json", "../../escape.json", "/tmp/escape.json", "a/../../escape.json",
                            "a\\..\\escape.json", "./x.json", "a//b.json", "escape.json\x00.txt", "ok/../ok.json",
                            "evil.bin", "weights.pt", "model.ckpt", "data.pkl", "manifest.json"])


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(path=st.one_of(escaping, st.text(alphabet=st.sampled_from("./\\a.\x00b"), min_size=1, max_size=10)),
       lie=st.integers(-3, 3))
def test_a_manifest_that_escapes_or_lies_is_refused_and_nothing_is_written(tmp_path_factory, path, lie):
    base = tmp_path_factory.mktemp("lying")
    archive_root, l2 = base / "archive", base / "l2"
    data = b'{"ok": true}'
    body = {"model": REF.model, "component": REF.component, "version": REF.version, "meta": {},
            "files": [{"path": path, "size": len(data) + lie, "sha256": hashlib.sha256(data).hexdigest()}]}
    folder = archive_root / REF.model / REF.component / REF.version
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps(body))
    safe = "".join(c if c.isalnum() else "_" for c in path) or "x"
    (folder / f"{safe}.json").write_bytes(data)
    before = snapshot_tree(base, inside=(l2,))
    with pytest.raises(ManifestError) as refused:
        sync_ref(LocalArchive(archive_root), SnapshotStore(l2), REF)
    assert repr(path)[1:-1] in str(refused.value) or "manifest" in str(refused.value)
    assert snapshot_tree(base, inside=(l2,)) == before
    assert not SnapshotStore(l2).has(REF)
    assert not (l2 / "blobs").exists() or not any((l2 / "blobs").iterdir())


def test_a_manifest_whose_size_lies_never_makes_a_file_visible(tmp_path):
    archive_root = tmp_path / "archive"
    data = b"x" * 1000
    raw_version(archive_root, REF, {}, {"model": REF.model, "component": REF.component, "version": REF.version,
                                        "meta": {}, "files": [{"path": "w.safetensors", "size": 10,
                                                               "sha256": hashlib.sha256(data).hexdigest()}]})
    (archive_root / REF.model / REF.component / REF.version / "w.safetensors").write_bytes(data)
    store = SnapshotStore(tmp_path / "l2")
    with pytest.raises(ChecksumMismatch, match="expected 10 bytes"):
        sync_ref(LocalArchive(archive_root), store, REF)
    assert not store.has(REF) and list(store.blobs.iterdir()) == [] and list(store.tmp.iterdir()) == []


@pytest.fixture
def release_archive(demo_archive_dir, tmp_path) -> LocalArchive:
    for ref in Release.parse(NEW).refs():
        shutil.copytree(demo_archive_dir / ref.model / ref.component / ref.version,
                        tmp_path / "archive" / ref.model / ref.component / ref.version)
    return LocalArchive(tmp_path / "archive")


def replace_in_manifest(archive: LocalArchive, ref: ComponentRef, path: str, data: bytes | None,
                        listed: bool = True) -> None:
    """Put `data` at `path` in a published version and make its manifest list it with the right hash (or not)."""
    folder = archive.root / ref.model / ref.component / ref.version
    body = json.loads((folder / "manifest.json").read_text())
    body["files"] = [f for f in body["files"] if f["path"] != path]
    if data is not None:
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
        if listed:
            body["files"].append({"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    (folder / "manifest.json").write_text(json.dumps(body))


def load_in_process(archive: LocalArchive, l2: Path):
    """What a worker's boot does, in this process: sync, verify, build the resident pipeline."""
    from cachemgr import Cache

    cache = Cache.at(l2)
    release = Release.parse(NEW)
    sync_release(archive, cache.store, release)
    return builder_for(family_of(cache.store, release)).builder(release.model, release).with_cache(cache).on(
        "cpu").build()


def test_a_pickle_listed_in_a_manifest_is_refused_and_never_loaded(release_archive, tmp_path):
    marker = tmp_path / "MARKER"
    for name in ("unet/diffusion_pytorch_model.bin", "text_encoder/pytorch_model.pt"):
        replace_in_manifest(release_archive, BASE, name, pickle.dumps(Marker(marker)))
        with pytest.raises(ManifestError, match="no pickled weights"):
            load_in_process(release_archive, tmp_path / "l2")
        replace_in_manifest(release_archive, BASE, name, None)
    assert not marker.exists()
    assert not SnapshotStore(tmp_path / "l2").has(BASE)


def test_a_pickle_next_to_a_version_but_not_listed_is_never_fetched_nor_loaded(release_archive, tmp_path):
    marker = tmp_path / "MARKER"
    folder = release_archive.root / BASE.model / BASE.component / BASE.version
    for name in ("unet/diffusion_pytorch_model.bin", "pytorch_model.bin", "unet/weights.pt"):
        (folder / name).write_bytes(pickle.dumps(Marker(marker)))
    resident = load_in_process(release_archive, tmp_path / "l2")
    png, _, _ = resident.generate(GenerateRequest(prompt="no pickles here", seed=1, steps=2, width=32, height=32))
    assert png.startswith(b"\x89PNG") and not marker.exists()
    snapshot = SnapshotStore(tmp_path / "l2").path(BASE)
    assert not [p for p in snapshot.rglob("*") if p.suffix in (".bin", ".pt", ".pkl")]


def lying_safetensors() -> bytes:
    """A safetensors file whose header claims a tensor far longer than the bytes that follow."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [1024, 1024], "data_offsets": [0, 4 << 20]}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + b"\0" * 64


@pytest.mark.fleet  # starts a Python process: the fleet layer (tests/layers.py)
@pytest.mark.parametrize("case", ["pickle named .safetensors", "header lies about offsets"])
def test_a_bad_weights_file_fails_the_worker_clearly_and_loads_no_pickle(fleet_settings, release_archive, tmp_path,
                                                                         case):
    """The archive's manifest lists the file with its true hash (sync accepts it), but the bytes are a pickle or a
    header that lies: the worker refuses to load, its state says why, and the pickle never runs."""
    marker = tmp_path / "MARKER"
    data = pickle.dumps(Marker(marker)) if case.startswith("pickle") else lying_safetensors()
    replace_in_manifest(release_archive, BASE, UNET, data)
    settings = fleet_settings.model_copy(update={"home": tmp_path / "home", "archive_url": release_archive.root.as_uri()})
    name = "w-" + case.split()[0]
    before = snapshot_tree(tmp_path, inside=(settings.home,))
    worker = start_worker(settings, [NEW], name, tmp_path / "logs", wait=False)
    assert worker.proc.wait(timeout=300) == 3, worker.log_text()[-2000:]
    state = {w.worker: w for w in WarmRegistry(redis.Redis.from_url(settings.broker_url)).workers()}[f"{name}@testnode"]
    assert state.state == "failed" and state.error.startswith("LoadError: cannot load"), state.error
    assert not marker.exists()
    after = snapshot_tree(tmp_path, inside=(settings.home,))
    assert {k for k in after if k not in before} <= {f"logs/{name}.log"}  # only the worker's own log was added
    with pytest.raises(LoadError):
        load_in_process(release_archive, tmp_path / "l2-again")
    assert not marker.exists()
