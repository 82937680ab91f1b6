"""Operating GPU workers: devices checked before any sync, one worker per GPU from `warmfleet up --gpus`, per-release
limits and VAE tiling, the Prometheus alerting rules (promtool) and the Grafana dashboard, whose metric names must be
ones the exporter really serves, and `python -m bench gpu` saying in one line that there is no GPU here."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fleetctl.demo.builders import DEMO_RELEASES

from .support import REPO, child_env

PROMETHEUS = REPO / "docker" / "prometheus"
DASHBOARD = REPO / "docker" / "grafana" / "warmfleet.json"
RELEASE = DEMO_RELEASES[-1]


def promtool(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    assert exe, "promtool must be installed (apt-get install prometheus; `./fleet setup` does it)"
    return subprocess.run([exe, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120)


def test_the_alerting_rules_are_valid():
    checked = promtool("check", "rules", "rules.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "11 rules found" in checked.stdout


def test_each_alert_fires_on_its_history_in_promtools_unit_tests():
    tested = promtool("test", "rules", "rules_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


def served_metric_names(redis_server, fleet_settings) -> set[str]:
    """Every sample name the exporter serves for a fleet with a route, a warm worker and a queued job."""
    import redis
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.registry import CollectorRegistry

    from fleetctl.metrics import FleetCollector, MissRateAlert
    from fleetstate.registry import WarmRegistry, WorkerState
    from fleetstate.routes import RouteTable

    client = redis.Redis.from_url(redis_server.url)
    RouteTable(client).set_active(RELEASE, actor="test")
    WarmRegistry(client).publish(WorkerState("gpu0@n1", "n1", 1, "warm", [RELEASE], device="cuda:0"))
    from fleetstate import jobstats

    jobstats.record_served(client, RELEASE, {"queued_ms": 3, "inference_ms": 90, "total_ms": 100})
    jobstats.record_failed(client, RELEASE, "other")
    from cachemgr import EventLog

    alert = MissRateAlert(client, EventLog(fleet_settings.event_log_path, "n1"), 0.01, 300)
    registry = CollectorRegistry()
    registry.register(FleetCollector(client, alert))
    families = text_string_to_metric_families(generate_latest(registry).decode())
    return {sample.name for family in families for sample in family.samples}


def used_metric_names(text: str) -> set[str]:
    return set(re.findall(r"\bwarmfleet_[a-z0-9_]+\b", text))


def test_rules_and_dashboard_use_only_metrics_the_exporter_serves(redis_server, fleet_settings):
    served = served_metric_names(redis_server, fleet_settings)
    rules = used_metric_names((PROMETHEUS / "rules.yml").read_text())
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = " ".join(t["expr"] for panel in dashboard["panels"] for t in panel["targets"])
    used = rules | used_metric_names(exprs)
    assert {"warmfleet_device_memory_bytes", "warmfleet_worker_state", "warmfleet_routed_release"} <= used
    assert used - served == set(), f"not served by the exporter: {sorted(used - served)}"


# -- devices -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device, says", [
    ("gpu", "'gpu' is not one of cpu, cuda, cuda:N, mps or auto"),
    ("cuda:7", "device cuda:7 asked, but torch sees no CUDA device here"),
])
def test_a_bad_device_is_refused_in_one_line_before_any_sync(fleet_settings, tmp_path, device, says):
    settings = fleet_settings.model_copy(update={"home": tmp_path, "archive_url": (tmp_path / "none").as_uri()})
    done = subprocess.run([sys.executable, "-m", "fleetctl.cli", "worker", "--release", RELEASE, "--device", device],
                          env=child_env(settings), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and says in done.stderr
    assert not (tmp_path / "l2").exists()  # nothing synced, nothing loaded
    from_env = subprocess.run([sys.executable, "-m", "fleetctl.cli", "worker", "--release", RELEASE],
                              env={**child_env(settings), "FLEET_DEVICE": device}, cwd=REPO, capture_output=True,
                              text=True, timeout=120)
    assert from_env.returncode == 2 and says in from_env.stderr


def test_dtypes_are_checked_with_their_device():
    from workers.device import DeviceError, resolve_device, resolve_dtype

    assert resolve_device("cpu") == "cpu" and resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("auto", "cuda:1") == "float16"
    with pytest.raises(DeviceError, match="float64"):
        resolve_dtype("float64", "cpu")


def record_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gpus: list[int] | None, releases: list[str],
              devices: int = 4) -> list[tuple[list[str], dict[str, str]]]:
    """What `warmfleet up` spawns for its workers (argv, environment), with `devices` GPUs as torch would see them."""
    import torch

    from fleetctl import localfleet
    from fleetctl.localfleet import LocalFleet, Proc
    from tasks.settings import FleetSettings

    spawned: list[tuple[list[str], dict[str, str]]] = []

    def spawn(self: LocalFleet, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        if name.startswith("worker-"):
            spawned.append((argv[3:], env))
        return Proc(name, 0, str(tmp_path / f"{name}.log"))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: devices > 0)  # the GPUs this node does not have
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)
    monkeypatch.setattr(LocalFleet, "_spawn", spawn)
    monkeypatch.setattr(LocalFleet, "_prepare_models", lambda self, releases: None)
    monkeypatch.setattr(LocalFleet, "_route", lambda self, url, releases, active: None)
    monkeypatch.setattr(LocalFleet, "_wait_warm", lambda self, state, releases, timeout: None)
    monkeypatch.setattr(localfleet, "wait_port", lambda port, timeout=15.0: None)
    monkeypatch.setattr(localfleet, "wait_redis", lambda *args, **kwargs: None)
    monkeypatch.setattr(localfleet.shutil, "which", lambda name: f"/usr/bin/{name}")
    LocalFleet(FleetSettings(home=tmp_path), log=lambda *_: None).up(releases, None, flower=False, beat=False,
                                                                     gpus=gpus)
    return spawned


def test_up_with_gpus_starts_one_worker_per_gpu_each_seeing_only_its_own(tmp_path, monkeypatch):
    old, new = DEMO_RELEASES
    spawned = record_up(tmp_path, monkeypatch, [0, 1, 2, 3], [old, new])
    assert [argv for argv, _ in spawned] == [
        ["worker", "--release", release, "--name", f"gpu{gpu}", "--device", "cuda:0", "--loglevel", "INFO"]
        for gpu, release in ((0, old), (1, new), (2, old), (3, new))]
    assert [(env["CUDA_VISIBLE_DEVICES"], env["FLEET_DEVICE"]) for _, env in spawned] == [
        (str(gpu), "cuda:0") for gpu in range(4)]


def test_up_without_gpus_leaves_the_device_to_the_settings(tmp_path, monkeypatch):
    spawned = record_up(tmp_path, monkeypatch, None, list(DEMO_RELEASES))
    assert [argv[4] for argv, _ in spawned] == ["gpu0", "gpu1"]
    assert all("--device" not in argv and "CUDA_VISIBLE_DEVICES" not in env for argv, env in spawned)


@pytest.mark.parametrize("gpus, devices, says", [
    ("0,9", 4, "GPU 9 not on this node; it has 4"),
    ("0", 0, "torch sees no CUDA device on this node"),
    ("0,x", 4, "give GPU indexes separated by commas"),
    ("1,1", 4, "names a GPU twice"),
])
def test_up_refuses_gpus_the_node_lacks_in_one_line(tmp_path, monkeypatch, gpus, devices, says):
    import torch
    from click.testing import CliRunner

    from fleetctl.cli import main as cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: devices > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)
    result = CliRunner().invoke(cli, ["up", "--gpus", gpus], env={"FLEET_HOME": str(tmp_path)})
    assert result.exit_code == 1 and result.output.count("\n") == 1 and says in result.output
    assert not (tmp_path / "state" / "fleet.json").exists()


# -- per-release limits and tuning -------------------------------------------------------------------------------


def resident_with(meta: dict, pipeline=None):
    from workers.limits import limits_of
    from workers.resident import ResidentPipeline

    return ResidentPipeline(release=RELEASE, family="sdxl", pipeline=pipeline, device="cpu", dtype="float32",
                            defaults={"steps": 30, "guidance": 5.0, "width": 1024, "height": 1024},
                            limits=limits_of(meta), tuning=meta)


def test_requests_over_the_release_limits_are_refused_in_one_line():
    from tasks.errors import JobRefused
    from tasks.requests import GenerateRequest

    resident = resident_with({"max_width": 1024, "max_height": 1024, "max_steps": 40})
    assert resident.resolve(GenerateRequest(prompt="ok", width=1024, height=768, steps=40))["width"] == 1024
    with pytest.raises(JobRefused) as refused:
        resident.resolve(GenerateRequest(prompt="big", width=2048, height=2048))
    assert str(refused.value) == (f"2048x2048, 30 steps is over the limits of {RELEASE} (width 2048 > 1024; "
                                  "height 2048 > 1024): it allows at most 1024x1024, 40 steps")
    with pytest.raises(JobRefused, match="steps 60 > 40"):
        resident.resolve(GenerateRequest(prompt="long", steps=60))
    assert resident_with({}).resolve(GenerateRequest(prompt="x", width=2048, height=2048))["width"] == 2048


def test_a_malformed_limit_is_refused_at_load():
    from workers.limits import limits_of

    with pytest.raises(ValueError, match="max_width='wide'"):
        limits_of({"max_width": "wide"})
    assert limits_of({"max_batch": "4", "family": "sdxl"}) == {"max_batch": 4}


def test_the_vae_decodes_in_tiles_only_above_the_release_threshold():
    from types import SimpleNamespace

    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4)
    resident = resident_with({"vae_tiling_above": 1024}, pipeline=SimpleNamespace(vae=vae))
    resident.tile_for({"width": 1536, "height": 1024})
    assert vae.use_tiling is True
    resident.tile_for({"width": 1024, "height": 1024})
    assert vae.use_tiling is False


# -- the GPU benchmark -------------------------------------------------------------------------------------------


def test_the_gpu_benchmark_says_in_one_line_that_there_is_no_gpu_here():
    done = subprocess.run([sys.executable, "-m", "bench", "gpu"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**child_env_plain(), "PYTHONPATH": str(REPO)})
    assert done.returncode == 2, done.stdout + done.stderr
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert lines == ["bench gpu: no CUDA device here (torch sees none); run it on a GPU node"]


def child_env_plain() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}


def test_channels_last_and_compile_are_applied_as_the_release_meta_asks():
    from types import SimpleNamespace

    import torch
    from diffusers import UNet2DConditionModel

    from fleetctl.demo.builders import TINY_UNET
    from workers.limits import apply_tuning

    def pipe():
        return SimpleNamespace(unet=UNet2DConditionModel(**TINY_UNET), vae=torch.nn.Conv2d(4, 4, 3))

    plain = pipe()
    assert apply_tuning(plain, {}, "cpu") == []
    assert not plain.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)

    tuned = pipe()
    assert apply_tuning(tuned, {"channels_last": True, "compile_unet": True}, "cpu") == ["channels_last",
                                                                                        "compile_unet"]
    assert tuned.vae.weight.is_contiguous(memory_format=torch.channels_last)
    assert isinstance(tuned.unet, torch._dynamo.eval_frame.OptimizedModule)  # compiled lazily, at the warm-up call
    assert tuned.unet._orig_mod.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
