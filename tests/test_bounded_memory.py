"""Publish and sync in bounded memory: a model far larger than the bound moves through with peak RSS (read by the
process itself: VmHWM) well under it — including a differential sync where most of the file changed, and
over the OSS protocol.

Sizes: a 330 MB safetensors file (one 170 MB tensor and 40 of 4 MB); version 2 changes the big tensor and 30 of the
small ones (~290 MB changed). The sync runs with a 16 MiB fetch buffer and must stay under 96 MiB above the
interpreter; holding the changed ranges (the old behaviour) or one whole tensor (the old publish) cannot."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cachemgr import LocalArchive
from cachemgr.names import ComponentRef
from cachemgr.store import SnapshotStore
from ossserver import OssServer

BOUND_MIB = 96
BUFFER = 16 << 20
BIG = 170 << 20
SMALL = 4 << 20
V1 = ComponentRef("huge", "base", "v1")
V2 = ComponentRef("huge", "base", "v2")
AK, SK = "bounded-ak", "bounded-sk"
REPO = Path(__file__).resolve().parents[1]


def _write_safetensors(path: Path, seeds: dict[str, tuple[int, int]]) -> None:
    """U8 tensors of (size, seed) streamed to disk 8 MiB at a time (this process never holds one whole)."""
    header, offset = {}, 0
    for name, (size, _) in seeds.items():
        header[name] = {"dtype": "U8", "shape": [size], "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for size, seed in seeds.values():
            rng = np.random.default_rng(seed)
            for start in range(0, size, 8 << 20):
                fh.write(rng.bytes(min(8 << 20, size - start)))


def _version(folder: Path, changed: bool) -> Path:
    seeds = {"big.weight": (BIG, 1000 + changed)}
    for i in range(40):
        seeds[f"block{i}.weight"] = (SMALL, i + (100 if changed and i < 30 else 0))
    _write_safetensors(folder / "unet" / "diffusion_pytorch_model.safetensors", seeds)
    (folder / "model_index.json").write_text('{"_class_name": "X"}')
    return folder


def _peak_above_start(code: str, **env: str) -> tuple[float, dict]:
    """Run `code` in a fresh interpreter (after the imports it needs); MiB of peak RSS above the RSS it had
    before running it, and whatever the code left in `out`."""
    script = textwrap.dedent("""
        import json
        from pathlib import Path
        from cachemgr import LocalArchive
        from cachemgr.archive.oss import OssArchive
        from cachemgr.names import ComponentRef
        from cachemgr.store import SnapshotStore
        from cachemgr.sync import sync_ref
        def status_kib(field):  # VmHWM, not ru_maxrss: ru_maxrss carries the forking parent's peak across exec
            for line in open("/proc/self/status"):
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        before = status_kib("VmRSS")
        out = {}
    """) + textwrap.dedent(code) + textwrap.dedent("""
        peak = status_kib("VmHWM")
        print(json.dumps({"above_mib": (peak - before) / 1024, "out": out}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    return data["above_mib"], data["out"]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Both versions published into a local archive by a child process, each publish's peak RSS recorded."""
    root = tmp_path_factory.mktemp("bounded")
    sources = {V1: _version(root / "src1", False), V2: _version(root / "src2", True)}
    archive = root / "archive"
    peaks = []
    for ref, src in sources.items():
        above, out = _peak_above_start(f"""
            m = LocalArchive({str(archive)!r}).publish(ComponentRef({ref.model!r}, {ref.component!r}, {ref.version!r}), Path({str(src)!r}))
            out["files"] = len(m.files)
        """)
        assert out["files"] == 2
        peaks.append(above)
    for src in sources.values():
        for f in src.rglob("*.safetensors"):
            f.unlink()
    return root, archive, peaks


def test_publish_of_a_file_bigger_than_the_bound_stays_under_it(published):
    _, archive, peaks = published
    assert max(peaks) < BOUND_MIB, f"publish peaked {max(peaks):.0f} MiB above the interpreter"
    entry = LocalArchive(archive).read_manifest(V2).file("unet/diffusion_pytorch_model.safetensors")
    assert entry.size > 3 * (BOUND_MIB << 20)
    assert len(entry.tensors) == 41 and len(entry.pieces) == 42  # header + every tensor, hashed in the one pass


def _sync_code(archive_expr: str, l2: Path) -> str:
    return f"""
        archive = {archive_expr}
        store = SnapshotStore({str(l2)!r})
        for ref in (ComponentRef("huge", "base", "v1"), ComponentRef("huge", "base", "v2")):
            report = sync_ref(archive, store, ref, buffer_bytes={BUFFER})
            out[ref.version] = {{"fetched": report.bytes_fetched, "reused": report.bytes_reused,
                                 "gets": report.ranged_gets}}
    """


def _check_sync(l2: Path, above: float, out: dict) -> None:
    assert above < BOUND_MIB, f"sync peaked {above:.0f} MiB above the interpreter"
    changed = BIG + 30 * SMALL
    assert out["v2"]["fetched"] >= changed
    assert out["v2"]["fetched"] < changed + (2 << 20)  # the changed tensors (and the header), nothing else
    assert out["v2"]["reused"] >= 10 * SMALL
    store = SnapshotStore(l2)
    assert [c.ok for c in store.check(V2)] == [True, True]
    assert not [p for p in store.tmp.iterdir() if p.is_file()]  # no partial left behind


def test_differential_sync_of_a_mostly_changed_large_file_stays_under_the_bound(published, tmp_path):
    _, archive, _ = published
    above, out = _peak_above_start(_sync_code(f"LocalArchive({str(archive)!r})", tmp_path / "l2"))
    _check_sync(tmp_path / "l2", above, out)


def test_sync_over_the_oss_protocol_stays_under_the_bound(published, tmp_path):
    _, archive, _ = published
    with OssServer(tmp_path / "oss", access_key_id=AK, access_key_secret=SK, log_requests=False) as server:
        server.create_bucket("models")
        remote = LocalArchive(archive)
        from cachemgr.archive.oss import OssArchive
        oss = OssArchive("models", "p", endpoint=server.endpoint, access_key_id=AK, access_key_secret=SK)
        for ref in (V1, V2):
            manifest = remote.read_manifest(ref)
            for entry in manifest.files:
                oss.put_file(ref, entry.path, archive / ref.model / ref.component / ref.version / entry.path)
            oss.put_manifest(manifest)
        oss.close()
        expr = (f"OssArchive('models', 'p', endpoint={server.endpoint!r}, access_key_id={AK!r}, "
                f"access_key_secret={SK!r})")
        above, out = _peak_above_start(_sync_code(expr, tmp_path / "l2"))
    _check_sync(tmp_path / "l2", above, out)
