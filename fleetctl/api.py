"""`warmfleet api`: HTTP for producers in any language, in front of the same `generate` task Python producers call.

    POST /v1/generations            a job in (the request model of tasks/requests.py): 202 and its id; 422 and the
                                    one line `generate.delay` raises for bad input
    GET  /v1/generations/{id}       its status and, when done, the result's metadata and a signed image URL
                                    (?wait=S: up to S seconds, at most 30, for it to finish)
    GET  /v1/images/{id}.png        the image, by the signed, expiring URL (no key: the URL is the capability)
    GET  /v1/openapi.json           the OpenAPI document
    GET  /healthz                   liveness

Every request but the image and the document carries `Authorization: Bearer <key>` (or `X-API-Key`); keys are
per client, stored hashed (fleetctl/apikeys.py). Each key has a rate limit (429 with Retry-After) and a cap on its
jobs queued or running (429). A job's id carries an HMAC of its client: a key sees its own jobs only (404 otherwise).

The server is tornado (installed with Flower, which the fleet runs anyway): one event loop; the Celery calls, which
block, run in a thread pool. It logs in to Redis as the producer role only (fleetstate/acl.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import tornado.web

from tasks.settings import FleetSettings

from .apikeys import ApiKeys, RateLimiter, UrlSigner, job_id_for, owns
from .openapi import OPENAPI

MAX_WAIT_S = 30.0
POLL_S = 0.02
STATUS = {"PENDING": "queued", "RECEIVED": "queued", "STARTED": "running", "RETRY": "retrying",
          "SUCCESS": "succeeded", "FAILURE": "failed", "REVOKED": "cancelled"}


class Api:
    """What the handlers share: settings, keys, limits, the signer and the Celery app (the producer's)."""

    def __init__(self, settings: FleetSettings, celery_app: Any = None) -> None:
        import tasks

        self.settings = settings
        self.app = celery_app or tasks.configure(settings)
        self.generate = self.app.tasks["warmfleet.generate"]
        self.keys = ApiKeys(settings.resolved_api_keys_file)
        self.limiter = RateLimiter(settings.api_rate_per_minute, settings.api_burst)
        self.signer = UrlSigner(settings.api_url_secret, settings.api_url_ttl_seconds)
        self.pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="api")
        self.queued: dict[str, set[str]] = {}

    async def call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def base_url(self, request: Any) -> str:
        return (self.settings.api_public_url or f"{request.protocol}://{request.host}").rstrip("/")

    def outstanding(self, client: str) -> int:
        """The client's jobs not finished yet (those finished are forgotten as they are found)."""
        ids = self.queued.setdefault(client, set())
        for job_id in list(ids):
            if self.app.AsyncResult(job_id).ready():
                ids.discard(job_id)
        return len(ids)

    def submit(self, client: str, body: Any) -> tuple[int, dict[str, Any]]:
        from tasks.requests import BadRequest, GenerateRequest

        if not isinstance(body, dict):
            return 422, {"error": "bad generate request: the body must be a JSON object of parameters"}
        try:
            GenerateRequest.parse(**body)  # the same model and the same line as generate.delay
            if self.outstanding(client) >= self.settings.api_max_queued:
                return 429, {"error": f"too many jobs queued: at most {self.settings.api_max_queued} per key; "
                             f"wait for some to finish"}
            job_id = job_id_for(client, self.signer.secret)
            self.generate.apply_async(kwargs=body, task_id=job_id)
        except BadRequest as exc:  # JobRefused too: a release the archive lacks
            return 422, {"error": str(exc).splitlines()[0]}
        self.queued[client].add(job_id)
        return 202, {"id": job_id, "status": "queued", "url": f"/v1/generations/{job_id}"}

    def describe(self, job_id: str, base: str) -> dict[str, Any]:
        result = self.app.AsyncResult(job_id)
        state = result.state
        out: dict[str, Any] = {"id": job_id, "status": STATUS.get(state, state.lower())}
        if state == "SUCCESS" and isinstance(result.result, dict):
            meta = {k: v for k, v in result.result.items() if k not in ("image_uri", "image_key")}
            expires, sig = self.signer.sign(job_id)
            out["result"] = meta
            out["image_url"] = f"{base}/v1/images/{job_id}.png?expires={expires}&sig={sig}"
            out["image_url_expires"] = expires
        elif state == "FAILURE":
            from tasks.errors import one_line

            error = result.result
            out["error"] = one_line(error) if isinstance(error, BaseException) else str(error)
        return out

    def image(self, job_id: str) -> bytes | None:
        from workers.outputs import open_output_store, read_uri

        result = self.app.AsyncResult(job_id)
        if result.state != "SUCCESS" or not isinstance(result.result, dict):
            return None
        uri = str(result.result.get("image_uri") or "")
        if uri.startswith("file://"):
            return read_uri(uri)
        store = open_output_store(self.settings.resolved_output_url, **self.settings.oss_options())
        return store.get(str(result.result.get("image_key") or uri.rstrip("/").rsplit("/", 1)[-1]))


class Base(tornado.web.RequestHandler):
    api: Api

    def initialize(self, api: Api) -> None:
        self.api = api

    def fail(self, status: int, line: str, **headers: str) -> None:
        for name, value in headers.items():
            self.set_header(name, value)
        self.set_status(status)
        self.finish({"error": line})

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.finish({"error": self._reason if status_code < 500 else "internal error; see the API's log"})

    def client(self) -> str | None:
        """The key's client, or None after answering 401 or 429."""
        header = self.request.headers.get("Authorization", "")
        key = header[7:].strip() if header.lower().startswith("bearer ") else self.request.headers.get("X-API-Key")
        client = self.api.keys.client_of(key)
        if client is None:
            self.fail(401, "missing or wrong API key: send `Authorization: Bearer <key>`" if key is not None or header
                      else "missing API key: send `Authorization: Bearer <key>`", **{"WWW-Authenticate": "Bearer"})
            return None
        wait = self.api.limiter.take(client)
        if wait > 0:
            self.fail(429, f"rate limit of {self.api.settings.api_rate_per_minute:g} requests a minute exceeded; "
                      f"retry in {wait:.1f}s", **{"Retry-After": str(max(1, round(wait)))})
            return None
        return client


class Generations(Base):
    async def post(self) -> None:
        client = self.client()
        if client is None:
            return
        try:
            body = json.loads(self.request.body or b"null")
        except ValueError as exc:
            return self.fail(422, f"bad generate request: the body is not JSON ({exc})")
        status, answer = await self.api.call(self.api.submit, client, body)
        self.set_status(status)
        if status == 202:
            self.set_header("Location", answer["url"])
        self.finish(answer)


class Generation(Base):
    async def get(self, job_id: str) -> None:
        client = self.client()
        if client is None:
            return
        if not owns(client, job_id, self.api.signer.secret):
            return self.fail(404, f"no generation {job_id} for this key")
        try:
            wait = min(MAX_WAIT_S, max(0.0, float(self.get_query_argument("wait", "0"))))
        except ValueError:
            return self.fail(422, "wait must be a number of seconds")
        base = self.api.base_url(self.request)
        deadline = time.monotonic() + wait
        while True:
            answer = await self.api.call(self.api.describe, job_id, base)
            if answer["status"] in ("succeeded", "failed", "cancelled") or time.monotonic() >= deadline:
                return self.finish(answer)
            await asyncio.sleep(POLL_S)


class Image(Base):
    async def get(self, job_id: str) -> None:
        why = self.api.signer.check(job_id, self.get_query_argument("expires", None),
                                    self.get_query_argument("sig", None))
        if why:
            return self.fail(403, why)
        data = await self.api.call(self.api.image, job_id)
        if data is None:
            return self.fail(404, f"no image for {job_id}")
        self.set_header("Content-Type", "image/png")
        self.set_header("Cache-Control", "private, max-age=60")
        self.finish(data)


class OpenApi(Base):
    def get(self) -> None:
        self.finish(OPENAPI)


class Health(Base):
    def get(self) -> None:
        self.finish({"ok": True})


def make_app(api: Api) -> tornado.web.Application:
    args = {"api": api}
    return tornado.web.Application([
        (r"/v1/generations", Generations, args),
        (r"/v1/generations/([0-9a-f-]{36})", Generation, args),
        (r"/v1/images/([0-9a-f-]{36})\.png", Image, args),
        (r"/v1/openapi.json", OpenApi, args),
        (r"/healthz", Health, args),
    ])


def serve(settings: FleetSettings, log: Any = print) -> None:
    """Run the API until interrupted."""
    api = Api(settings)

    async def main() -> None:
        server = make_app(api).listen(settings.api_port, address=settings.api_address, xheaders=False)
        log(f"warmfleet api on http://{settings.api_address}:{settings.api_port} (keys: {api.keys.path})")
        try:
            await asyncio.Event().wait()
        finally:
            server.stop()

    asyncio.run(main())
