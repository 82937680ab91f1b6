"""The reference scenario's worker rows, on real worker processes (bench/bench_reference.py runs them).

A private redis-server and workers reading the scenario's OSS server (no link emulation: a warm node moves no bytes).
The release is an SDXL single-file base + a kohya LoRA published by `warmfleet publish`; on CPU the workers compute
in float32 (CPU half precision is ~60× slower than float32 here), one torch thread, 64×64 images, 1 step.
- warm restart: a worker filled its L2 and stopped; a job is queued, a new worker process is started on the same
  node and the clock runs from its spawn to the job's result (publish converted the single file into a diffusers
  folder, which the worker loads with `from_pretrained`). Against it, in the same run: a new Python process that
  does a bare `StableDiffusionXLPipeline.from_single_file` of the original checkpoint (the file publish was given,
  configs from the published version) + `load_lora_weights` of the same L2 LoRA file + the same image, from spawn to
  image: what a diffusers user does with the file. Each measured `repeats` times.
- rollback under load: two releases (LoRA v1, v2 on one base) warm on one worker (the second went live with
  `fleetctl.live.warm`); 10 producer threads send jobs by model name (closed loop) while the route flips back and
  forth (`fleetstate.rollout.rollback`); flip = rollback call until the producers' router serves the new release;
  lost = jobs sent without a result; reloads = the worker's pipeline loads during the flips.
- 10 users: 10 threads, each sending one job and waiting for it, until `jobs` are done; failures, p50/p95 latency.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE = {"steps": 1, "width": 64, "height": 64}
BARE = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    torch.set_num_threads(1)
    from diffusers import StableDiffusionXLPipeline
    ckpt, config, lora, dtype = sys.argv[1:5]
    pipe = StableDiffusionXLPipeline.from_single_file(ckpt, config=config, local_files_only=True,
                                                      torch_dtype=getattr(torch, dtype))
    pipe.load_lora_weights(str(Path(lora).parent), weight_name=Path(lora).name, adapter_name="style")
    image = pipe("a leather jacket", num_inference_steps=1, width=64, height=64,
                 generator=torch.Generator().manual_seed(7)).images[0]
    print("image", image.size)
""")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def _l2_files(settings, model: str, base: str, lora: str, checkpoint: Path) -> tuple[Path, Path, Path, Path]:
    """(checkpoint, config folder, LoRA file, base folder): the original checkpoint and, from the node's L2, the
    configs, the LoRA and the base folder the worker loaded. A base converted at publish is a diffusers folder whose
    configs `from_single_file` reads as its `config=`; one published the old way holds the checkpoint and config/."""
    from cachemgr import Cache
    from cachemgr.manifest import sha256_file
    from cachemgr.names import ComponentRef
    from workers.models.single_file import CONFIG_FOLDER, checkpoint_file

    store = Cache.at(settings.resolved_cache_root).store
    ref = ComponentRef(model, "base", base)
    root = store.path(ref)
    meta = store.manifest(ref).meta
    lora_file = next(store.path(ComponentRef(model, "lora", lora)).rglob("*.safetensors"))
    if not meta.get("converted_from"):
        return checkpoint_file(root, meta), root / CONFIG_FOLDER, lora_file, root
    if sha256_file(checkpoint) != meta["converted_from"]["sha256"]:
        raise SystemExit(f"{checkpoint} is not the file {ref} was converted from")
    return checkpoint, root, lora_file, root


def _page_in(files: tuple[Path, Path, Path, Path]) -> None:
    """Read the release's files once, so each timed start finds them in the page cache (a warm node's L2): the
    checkpoint bare loads, the LoRA, and the weights of the base folder the worker loads."""
    for path in (files[0], files[2], *sorted(files[3].rglob("*.safetensors"))):
        buf = bytearray(1 << 24)
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def _bare(files: tuple[Path, Path, Path, Path], dtype: str, env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", BARE, *map(str, files[:3]), dtype], capture_output=True, text=True,
                          env=env,
                          cwd=ROOT, timeout=3600)
    took = time.perf_counter() - started
    if done.returncode != 0 or "image (64, 64)" not in done.stdout:
        raise SystemExit(f"bare from_single_file failed: {done.stderr[-2000:]}")
    return took


def run(work: Path, endpoint: str, model: str, versions: dict[str, str], checkpoint: Path, repeats: int = 2,
        jobs: int = 200, flips: int = 10, dtype: str = "float32", restart_only: bool = False) -> dict:
    """All three rows; `versions` = {"base": …, "lora_a": …, "lora_b": …} published under `model`, the base from
    `checkpoint` (what bare loads); ours and bare compute in `dtype`. One model process at a time (a full-size one is several GB): the last round runs bare first,
    so the worker it starts stays up for the other rows."""
    import redis

    import tasks
    from fleetctl.live import warm
    from fleetstate.registry import WarmRegistry
    from fleetstate.rollout import promote, rollback
    from tasks.settings import FleetSettings
    from tests.support import RedisServer, child_env, start_worker

    rel_a = f"{model}@base-{versions['base']}+lora-{versions['lora_a']}"
    rel_b = f"{model}@base-{versions['base']}+lora-{versions['lora_b']}"
    server = RedisServer(work / "redis", appendonly=False).start()
    worker = None
    try:
        settings = FleetSettings(home=work / "home", broker_url=server.url, archive_url="oss://models/ref",
                                 oss_endpoint=endpoint, torch_threads=1, heartbeat_seconds=2.0, warm_ttl_seconds=8.0,
                                 route_cache_ttl=600.0, node_name="refnode", dtype=dtype, model=model)
        tasks.configure(settings)
        client = redis.Redis.from_url(settings.broker_url)
        registry = WarmRegistry(client)
        logs = work / "logs"
        start_worker(settings, [rel_a], "w-fill", logs, wait=True, timeout=3600).stop()  # fills L2: not timed
        files = _l2_files(settings, model, versions["base"], versions["lora_a"], checkpoint)
        ours, bare = [], []
        for attempt in range(repeats):
            last = attempt == repeats - 1
            if last:
                _page_in(files)
                bare.append(_bare(files, dtype, child_env(settings)))
            _page_in(files)
            job = tasks.generate.delay("a leather jacket", seed=7, release=rel_a, **IMAGE)
            started = time.perf_counter()
            worker = start_worker(settings, [rel_a], "w-ref", logs, wait=False)
            job.get(timeout=3600)
            ours.append(time.perf_counter() - started)
            if not last:
                worker.stop()
                _page_in(files)
                bare.append(_bare(files, dtype, child_env(settings)))
        name = f"w-ref@{settings.node_name}"
        if restart_only:
            return {"release_a": rel_a, "dtype": dtype, "ours_s": ours, "bare_s": bare,
                    "warm_restart_over_bare": statistics.median(ours) / statistics.median(bare)}

        outcome = warm(tasks.app, client, settings.open_archive(), rel_b, on=["w-ref"], timeout=3600)
        if name not in outcome.done:
            raise SystemExit(f"live warm of {rel_b} failed: {outcome.refused or outcome.failed}")
        promote(client, model, rel_a, force=True, actor="bench")
        promote(client, model, rel_b, actor="bench")
        router = tasks.app.fleet_router
        loads_before = registry.worker(name).loads
        sent, stop = [], threading.Event()

        def producer(p: int) -> None:
            i = 0
            while not stop.is_set():
                result = tasks.generate.delay("a leather jacket", seed=p * 10_000 + i, model=model, **IMAGE)
                sent.append(result)
                try:
                    result.get(timeout=600)
                except Exception:  # counted below: a job without a result is lost
                    pass
                i += 1

        threads = [threading.Thread(target=producer, args=(p,), daemon=True) for p in range(10)]
        for t in threads:
            t.start()
        time.sleep(3.0)
        flip_ms = []
        for _ in range(flips):
            before = router.route(model)
            expected = before.previous
            seen = router.cache.generation
            t0 = time.perf_counter()
            rollback(client, model, actor="bench")
            if not router.cache.wait_generation(seen, timeout=10) or router.active(model) != expected:
                raise SystemExit("a rollback never reached the producers' router")
            flip_ms.append((time.perf_counter() - t0) * 1000)
            # a rollback only goes back down the route stack: promote the abandoned release again (not timed)
            seen = router.cache.generation
            promote(client, model, before.active, actor="bench")
            router.cache.wait_generation(seen, timeout=10)
            time.sleep(1.5)
        stop.set()
        for t in threads:
            t.join(timeout=900)
        served, lost = {}, 0
        for result in sent:
            try:
                out = result.get(timeout=600)
                served[out["release"]] = served.get(out["release"], 0) + 1
            except Exception:
                lost += 1
        reloads = registry.worker(name).loads - loads_before

        latencies, failures, lock = [], 0, threading.Lock()
        left = [jobs]

        def user(u: int) -> None:
            nonlocal failures
            while True:
                with lock:
                    if left[0] <= 0:
                        return
                    left[0] -= 1
                    seq = left[0]
                t0 = time.perf_counter()
                try:
                    tasks.generate.delay("a leather jacket", seed=seq, model=model, **IMAGE).get(timeout=600)
                    with lock:
                        latencies.append(time.perf_counter() - t0)
                except Exception:
                    with lock:
                        failures += 1

        began = time.perf_counter()
        users = [threading.Thread(target=user, args=(u,), daemon=True) for u in range(10)]
        for t in users:
            t.start()
        for t in users:
            t.join()
        users_s = time.perf_counter() - began
    finally:
        if worker is not None:
            worker.stop()
        try:
            tasks.app.pool.force_close_all()
        except Exception:
            pass
        server.stop()
    return {"release_a": rel_a, "release_b": rel_b, "dtype": dtype, "ours_s": ours, "bare_s": bare,
            "warm_restart_over_bare": statistics.median(ours) / statistics.median(bare),
            "flip_ms": flip_ms, "rollback_jobs": len(sent), "rollback_lost": lost, "rollback_reloads": reloads,
            "served": served, "users_jobs": jobs, "users_failures": failures, "users_seconds": users_s,
            "users_p50_s": percentile(latencies, 50) if latencies else None,
            "users_p95_s": percentile(latencies, 95) if latencies else None}


if __name__ == "__main__":
    print(json.dumps(run(Path(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), Path(sys.argv[5])),
                     indent=1))
