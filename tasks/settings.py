"""All configuration, read in one place: environment variables prefixed FLEET_, or a .env file.

Everything below is passed down as arguments; `cachemgr` never reads the environment.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from cachemgr.names import Release


def _node_default() -> str:
    import re

    return re.sub(r"[^a-z0-9._-]+", "-", socket.gethostname().lower()).strip("-._")[:64] or "node"


def _default_home() -> Path:
    return Path.home() / ".cache" / "warmfleet"


class FleetSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLEET_", env_file=".env", extra="ignore")

    home: Path = Field(default_factory=_default_home, description="root of every embedded default below")
    broker_url: str | None = Field(None, description="Celery broker; unset = the local fleet's private redis")
    result_url: str | None = Field(None, description="result backend; unset = the broker URL")
    cache_root: Path | None = Field(None, description="L2 on this node; unset = <home>/l2")
    archive_url: str | None = Field(None, description="L3: file:///dir or oss://bucket/prefix; unset = <home>/archive")
    output_url: str | None = Field(None, description="where images go: file:///dir or oss://bucket/prefix")

    oss_endpoint: str | None = None
    oss_access_key_id: str | None = None
    oss_access_key_secret: str | None = None
    oss_security_token: str | None = None
    archive_proxy: str | None = Field(None, description="http://host:port that L3 (oss://) requests go through: a "
                                      "site's caching proxy or a P2P daemon (Dragonfly's dfdaemon); bytes still verified")
    oss_timeout: float = Field(10.0, gt=0, description="seconds the archive waits for OSS to answer a request (oss2's "
                               "connect_timeout, the read timeout too): a multipart completion of a multi-GB file "
                               "on a slow store can need more")

    device: str = Field("auto", description="auto = cuda if present, else cpu")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    torch_threads: int = Field(1, ge=1, le=256, description="pinned: the same seed gives the same bytes only at the same count")

    model: str = Field("nano-banana", description="the model a job without one is for")
    worker_releases: Annotated[list[str], NoDecode] = Field(default_factory=list, description="releases this worker serves")
    node_name: str = Field(default_factory=lambda: _node_default())

    retention_keep: int = Field(5, ge=1)
    sync_hour: int = Field(2, ge=0, le=23)
    sync_minute: int = Field(0, ge=0, le=59)
    audit_hour: int = Field(3, ge=0, le=23)
    audit_minute: int = Field(30, ge=0, le=59)
    timezone: str = "UTC"

    sentinel_master: str = Field(
        "mymaster", description="the Sentinel master name, used when the broker or result URL is sentinel://…"
    )
    heartbeat_seconds: float = Field(5.0, gt=0)
    warm_ttl_seconds: float = Field(15.0, gt=0)
    visibility_timeout: int = Field(300, ge=10)
    route_cache_ttl: float = Field(2.0, ge=0)
    batch_max: int = Field(1, ge=1, le=64, description="jobs one pipeline call may serve together; 1 = no batching")
    batch_wait_ms: float = Field(
        20.0, ge=0, le=5000, description="how long a batching worker holds its first job waiting for companions"
    )
    job_max_retries: int = Field(3, ge=0, le=20, description="retries of a job whose pipeline call raised; then it is dead")
    job_retry_backoff: float = Field(
        1.0, ge=0, le=600, description="seconds before the first retry, doubled for each next one (capped at 60)"
    )
    job_lease_seconds: float = Field(
        15.0, ge=1, description="a running job's lease in Redis, renewed at a third of it; capped at visibility_timeout/2;"
        " keep it <= warm_ttl_seconds: a killed holder's job then restarts on a peer within the heartbeat TTL"
    )
    job_time_limit_s: float = Field(
        600.0, ge=0, description="a job running longer is stopped (its worker recycled) and retried on a peer; dead"
        " after job_max_retries more timeouts; a release's own limit (release metadata job_time_limit_s) wins; 0: none"
    )
    outbox_grace_seconds: float = Field(
        60.0, gt=0, description="a sent job in no queue and no worker's hands this long after its send (a pop whose "
        "reply was lost) is sent again by the outbox sweep"
    )
    job_extend_visibility: bool = Field(
        True, description="while a job runs, keep its unacked message fresh so Redis never redelivers a live job"
    )
    max_resident_adapters: int = Field(
        8, ge=0, le=256, description="LoRA adapters one worker holds at most (0: no bound); `warmfleet warm` past it "
        "retires the least recently used release nothing routes or pins"
    )
    max_adapter_bytes: int = Field(0, ge=0, description="bytes of LoRA files one worker holds at most (0: no bound)")

    failure_breaker: int = Field(
        5, ge=0, le=1000, description="this many different jobs failing in a row (none succeeding between) make the "
        "worker sick: it leaves the warm registry, stops consuming and fails `warmfleet health`; 0 = never")

    auto_warm: bool = Field(
        False, description="opt-in: releases declared with `warmfleet routes prewarm` are warmed on every running "
        "worker of their base, after each node's sync and on a beat tick"
    )
    auto_warm_seconds: float = Field(60.0, ge=5, description="beat's auto-warm tick, when auto_warm is on")
    verify_l2_at_boot: bool = Field(True, description="re-hash a release's L2 files against their manifests at boot")
    verify_l2_trust_seconds: float = Field(
        86400.0, ge=0, description="at boot, a file re-hashed (at a boot or by the nightly audit) less than this long "
        "ago and unchanged on disk since (size, inode, mtime, ctime) is not re-hashed; 0 = re-hash every file")

    peer_enabled: bool = Field(True, description="fill L2 from the site's other nodes before L3 (needs peer_secret)")
    peer_secret: str | None = Field(None, description="the fleet's shared secret that signs peer requests; unset = off")
    peer_address: str = Field("127.0.0.1", description="the interface this node's peer server binds to (the LAN's)")
    peer_port: int = Field(9810, ge=0, le=65535, description="its port; 0 = any free one (announced in Redis)")
    peer_advertise: str | None = Field(None, description="host[:port] peers should dial; unset = the bound address")
    peer_upload_mbps: float | None = Field(None, gt=0, description="cap on what this node uploads to all peers")
    peer_timeout: float = Field(10.0, gt=0, description="seconds before a silent peer is dropped for the run")
    peer_min_mbps: float = Field(
        8.0, ge=0, description="the least each request to a peer must deliver (Mbit/s) once its first 0.5 s are "
        "past; a request under it is given up, asked of another peer, and the peer dropped for the run; 0 = no floor")
    peer_quarantine_seconds: float = Field(
        600.0, gt=0, description="how long the site skips a peer that sent a bad piece, was under the rate floor or "
        "fell silent (a bad piece's entry goes as soon as the peer has verified and repaired the blob)")
    peer_lease_seconds: float = Field(30.0, gt=0, description="the site's origin-pull lease on a blob, renewed "
                                      "while its holder pulls; others take over this long after it dies")
    peer_wait_seconds: float = Field(900.0, ge=0, description="longest a node waits for another's origin pull")

    flower_port: int = 5555
    flower_user: str = "admin"
    flower_password: str | None = None
    flower_unauthenticated: bool = Field(False, description="serve Flower without a password (else one is generated)")
    metrics_port: int = 9808
    metrics_address: str = "127.0.0.1"
    alert_l3_miss_ratio: float = Field(0.01, gt=0, le=1, description="alert when L3 misses exceed this share…")
    alert_window_seconds: float = Field(300.0, gt=0, description="…for this long")
    alert_eval_seconds: float = Field(15.0, gt=0)
    alert_webhook_url: str | None = Field(None, description="POSTed a JSON body when an alert fires or resolves")
    canary_steps: str = Field("10,25,50,100", description="canary shares (%) `promote --analyze` steps through")
    canary_window_s: float = Field(300.0, gt=0, description="how long each canary share is watched before a step")
    canary_tick_s: float = Field(5.0, gt=0, description="how often beat runs the canary analysis tick")
    canary_max_failure_delta: float = Field(0.02, ge=0, le=1, description="a canary whose failure rate exceeds the "
                                            "active release's by more than this is rolled back")
    canary_max_p95_ratio: float = Field(1.5, gt=0, description="…or whose p95 total latency exceeds this times the "
                                        "active's (plus canary_p95_slack_s)")
    canary_p95_slack_s: float = Field(0.25, ge=0, description="seconds of p95 slack: small latencies jitter by more than any ratio")
    canary_min_jobs: int = Field(5, ge=1, description="jobs a canary must finish in a window before it is judged")

    role: Literal["producer", "worker", "maintenance", "operator", "monitoring"] | None = Field(
        None, description="with a local fleet and no FLEET_BROKER_URL: log in as this role (fleetstate/acl.py; its URL "
        "from the state file) instead of the fleet's admin")
    local_tls: bool = Field(False, description="`warmfleet up`: its Redis speaks TLS only (a CA and certificate made "
                            "under <home>/state/redis/tls); every process connects with rediss:// and verifies it")
    api_address: str = Field("127.0.0.1", description="the interface `warmfleet api` (HTTP for producers) binds to")
    api_port: int = Field(9820, ge=0, le=65535, description="its port; 0 = any free one")
    api_public_url: str | None = Field(None, description="the API's URL as clients reach it (signed image URLs); "
                                       "unset = http://<address>:<port>")
    api_keys_file: Path | None = Field(None, description="the API's keys, hashed (`warmfleet api-key add`); "
                                       "unset = <home>/state/api-keys.json")
    api_url_secret: str | None = Field(None, description="signs the API's image URLs; unset = one per API process "
                                       "(URLs then die with it)")
    api_url_ttl_seconds: float = Field(900.0, gt=0, description="how long a signed image URL works")
    api_rate_per_minute: float = Field(120.0, gt=0, description="requests one API key may make per minute "
                                       "(bursts up to api_burst); per API process")
    api_burst: int = Field(20, ge=1, description="requests one API key may make at once before the rate applies")
    api_max_queued: int = Field(32, ge=1, description="jobs of one API key queued or running at once; more: 429")

    @field_validator("node_name", mode="before")
    @classmethod
    def _node_name(cls, value: object) -> object:
        """Host names become queue names: lower-case them and replace what the name pattern refuses."""
        import re

        from cachemgr.names import validate_name

        if isinstance(value, str):
            value = re.sub(r"[^a-z0-9._-]+", "-", value.strip().lower()).strip("-._")[:64] or "node"
            validate_name(value, "node")
        return value

    @field_validator("archive_proxy")
    @classmethod
    def _proxy(cls, value: str | None) -> str | None:
        from cachemgr.ossclient import check_proxy

        return check_proxy(value.strip()) if value and value.strip() else None

    @field_validator("worker_releases", mode="before")
    @classmethod
    def _split_releases(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                return json.loads(value)
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("worker_releases")
    @classmethod
    def _valid_releases(cls, value: list[str]) -> list[str]:
        return [str(Release.parse(v)) for v in value]

    # -- derived locations
    @property
    def state_dir(self) -> Path:
        return self.home / "state"

    @property
    def resolved_cache_root(self) -> Path:
        return (self.cache_root or self.home / "l2").expanduser().absolute()

    @property
    def resolved_archive_url(self) -> str:
        recorded = self._local_fleet().get("archive_url") if not self.archive_url else None
        return self.archive_url or str(recorded or (self.home / "archive").absolute().as_uri())

    @property
    def resolved_output_url(self) -> str:
        return self.output_url or (self.home / "outputs").absolute().as_uri()

    @property
    def peers_on(self) -> bool:
        return self.peer_enabled and bool(self.peer_secret)

    @property
    def event_log_path(self) -> Path:
        return self.home / "events.jsonl"

    @property
    def resolved_api_keys_file(self) -> Path:
        return (self.api_keys_file or self.state_dir / "api-keys.json").expanduser().absolute()

    def local_fleet_file(self) -> Path:
        return self.state_dir / "fleet.json"

    @property
    def resolved_broker_url(self) -> str | None:
        """The configured broker, else the one of a local fleet started by `warmfleet up` under this home."""
        if self.broker_url:
            return self.broker_url
        fleet = self._local_fleet()
        roles = fleet.get("roles") if isinstance(fleet.get("roles"), dict) else {}
        if self.role:
            return roles.get(self.role)  # type: ignore[union-attr,return-value]
        return fleet.get("broker_url")  # type: ignore[return-value]

    @property
    def resolved_result_url(self) -> str | None:
        return self.result_url or self.resolved_broker_url

    def _local_fleet(self) -> dict[str, object]:
        """What `warmfleet up` recorded for producers and operators on this machine (broker, OSS archive)."""
        try:
            return json.loads(self.local_fleet_file().read_text())
        except (OSError, ValueError):
            return {}

    def oss_options(self) -> dict[str, object]:
        """Endpoint and credentials: the settings', else those of a local OSS-backed fleet when its archive is used."""
        fleet = self._local_fleet() if not self.archive_url and not self.oss_endpoint else {}
        recorded = fleet.get("oss") if isinstance(fleet.get("oss"), dict) else {}
        return {
            k: v
            for k, v in {
                "endpoint": self.oss_endpoint or recorded.get("endpoint"),
                "access_key_id": self.oss_access_key_id or recorded.get("access_key_id"),
                "access_key_secret": self.oss_access_key_secret or recorded.get("access_key_secret"),
                "security_token": self.oss_security_token,
            }.items()
            if v is not None
        }

    def archive_options(self) -> dict[str, object]:
        """oss_options plus where resumable-download checkpoints go: under this node's cache, never in $HOME."""
        options = self.oss_options()
        if self.resolved_archive_url.startswith("oss://"):
            options["checkpoint_dir"] = self.resolved_cache_root / "checkpoints"
            options["connect_timeout"] = self.oss_timeout
        if self.archive_proxy:
            options["proxy"] = self.archive_proxy
        return options

    def open_archive(self):  # noqa: ANN201 - cachemgr's Archive; imported lazily to keep settings light
        from cachemgr import open_archive

        return open_archive(self.resolved_archive_url, **self.archive_options())

    def state_client(self, **transport: Any):  # noqa: ANN201 - redis.Redis; imported lazily to keep settings light
        """A Redis client for the fleet state on the broker's server (plain or Sentinel; fleetstate.client)."""
        from fleetstate.client import redis_client

        url = self.resolved_broker_url
        if not url:
            raise ValueError("no broker configured: set FLEET_BROKER_URL or start a local fleet")
        return redis_client(url, self.sentinel_master, **transport)

    def child_env(self) -> dict[str, str]:
        """These settings as FLEET_ variables, for processes the CLI starts."""
        env: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            key = "FLEET_" + name.upper()
            env[key] = json.dumps(value) if isinstance(value, list) else str(value)
        return env


def load_settings(**overrides: object) -> FleetSettings:
    return FleetSettings(**overrides)  # type: ignore[arg-type]


OFFLINE_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
"""No hub access, ever: what every process that may import diffusers/transformers runs with."""


def offline_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """Set OFFLINE_ENVIRONMENT (where unset) in `env`, or in this process before diffusers is imported."""
    target = os.environ if env is None else env
    for key, value in OFFLINE_ENVIRONMENT.items():
        target.setdefault(key, value)
    return target  # type: ignore[return-value]
