"""Settings come from FLEET_ variables or a .env file, and are validated once."""

import pytest
from pydantic import ValidationError

from tasks.settings import FleetSettings


def test_defaults_need_nothing_configured(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = FleetSettings(home=tmp_path)
    assert s.resolved_archive_url == (tmp_path / "archive").as_uri()
    assert s.resolved_cache_root == tmp_path / "l2"
    assert s.resolved_output_url == (tmp_path / "outputs").as_uri()
    assert s.resolved_broker_url is None
    assert s.torch_threads == 1 and s.timezone == "UTC" and (s.sync_hour, s.sync_minute) == (2, 0)


def test_environment_variables_override(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLEET_BROKER_URL", "redis://10.0.0.5:6379/2")
    monkeypatch.setenv("FLEET_CACHE_ROOT", str(tmp_path / "nvme"))
    monkeypatch.setenv("FLEET_WORKER_RELEASES", "nano-banana@base-v1.0.0+lora-v2.3.0, nano-banana@base-v1.1.0")
    monkeypatch.setenv("FLEET_TORCH_THREADS", "4")
    s = FleetSettings()
    assert s.resolved_broker_url == "redis://10.0.0.5:6379/2"
    assert s.resolved_result_url == "redis://10.0.0.5:6379/2"
    assert s.resolved_cache_root == tmp_path / "nvme"
    assert s.worker_releases == ["nano-banana@base-v1.0.0+lora-v2.3.0", "nano-banana@base-v1.1.0"]
    assert s.torch_threads == 4


def test_dotenv_file_is_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("FLEET_ARCHIVE_URL=oss://ai-models/nano-banana\nFLEET_OSS_ENDPOINT=http://127.0.0.1:9\n")
    s = FleetSettings()
    assert s.resolved_archive_url == "oss://ai-models/nano-banana"
    assert s.oss_options() == {"endpoint": "http://127.0.0.1:9"}


@pytest.mark.parametrize(
    "var,value", [("FLEET_TORCH_THREADS", "0"), ("FLEET_WORKER_RELEASES", "../etc@base-v1"),
                  ("FLEET_SYNC_HOUR", "25"), ("FLEET_DTYPE", "int7"),
                  ("FLEET_ARCHIVE_PROXY", "127.0.0.1:3128")],
)
def test_bad_values_are_refused_at_start(tmp_path, monkeypatch, var, value):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(var, value)
    with pytest.raises(ValidationError):
        FleetSettings()


def test_child_environment_round_trips(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = FleetSettings(home=tmp_path, worker_releases=["nano-banana@base-v1.0.0"], broker_url="redis://127.0.0.1:1/0")
    for key, value in s.child_env().items():
        monkeypatch.setenv(key, value)
    assert FleetSettings() == s


def test_the_local_fleet_state_file_supplies_the_broker(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = FleetSettings(home=tmp_path)
    s.local_fleet_file().parent.mkdir(parents=True)
    s.local_fleet_file().write_text('{"broker_url": "redis://127.0.0.1:4242/0"}')
    assert s.resolved_broker_url == "redis://127.0.0.1:4242/0"
