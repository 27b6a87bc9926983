"""Exact requests from the real AWS SDK, taken at botocore's ``before-send`` event.

``before-send`` fires with the prepared request (method, URL, headers, body bytes) after signing,
just before botocore hands it to urllib3: what goes on the wire is this request line, these
headers and this body (urllib3 adds only ``Host`` from the URL, and framing). It is the seam the
TLS capture stands in for until it exists: :func:`captured` turns a prepared request into the
:class:`CapturedRequest` the capture will produce, bounded the way the capture is (request line
and headers first, the body gets what is left of ``limit`` bytes).

:class:`Recorder` records every request a client sends (to a real server), and
:func:`offline_requests` makes a client answer every request itself with a canned response, so
tests get the SDK's exact requests for AWS's own endpoints without any network.
"""

from __future__ import annotations

import io
from contextlib import contextmanager
from urllib.parse import urlsplit

import boto3
from botocore.awsrequest import AWSResponse
from botocore.config import Config

from sensor import syscalls
from sensor.aggregate import Aggregator
from sensor.httprequest import CapturedRequest
from sensor.profile import Profile
from sensor.workload import Workload

CAPTURE_LIMIT = 4096  # bytes per request: the bound the request capture applies

ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
SESSION_TOKEN = "FwoGZXIvYXdzEXAMPLETOKENsessiontoken0123456789"


def _body_bytes(body) -> bytes:
    if body is None:
        return b""
    if isinstance(body, (bytes, bytearray)):
        return bytes(body)
    if isinstance(body, str):
        return body.encode("utf-8")
    if hasattr(body, "read"):  # a file-like payload (put_object with a stream)
        pos = body.tell() if hasattr(body, "tell") else None
        data = body.read()
        if pos is not None:
            body.seek(pos)
        return data if isinstance(data, bytes) else data.encode("utf-8")
    return bytes(body)


def captured(prepared, limit: int = CAPTURE_LIMIT) -> CapturedRequest:
    """The bounded capture of a botocore ``AWSPreparedRequest``."""
    url = urlsplit(prepared.url)
    target = (url.path or "/") + (f"?{url.query}" if url.query else "")
    headers = tuple((k, v.decode("latin-1") if isinstance(v, bytes) else str(v))
                    for k, v in prepared.headers.items())
    head_len = len(f"{prepared.method} {target} HTTP/1.1\r\n") + len(f"Host: {url.netloc}\r\n") + \
        sum(len(k) + len(v) + 4 for k, v in headers) + 2
    body = _body_bytes(prepared.body)
    room = max(0, limit - head_len)
    return CapturedRequest(prepared.method, url.netloc, target, headers, body[:room], len(body) > room)


class Recorder:
    """Records the requests a client sends; register with :meth:`attach`."""

    def __init__(self, limit: int = CAPTURE_LIMIT):
        self.limit = limit
        self.requests: list[CapturedRequest] = []

    def attach(self, client) -> None:
        client.meta.events.register("before-send", self._record)

    def _record(self, request, **_):
        self.requests.append(captured(request, self.limit))
        return None  # let botocore send it

    def take(self) -> list[CapturedRequest]:
        out, self.requests = self.requests, []
        return out


class _Raw(io.BytesIO):
    def stream(self, **_):
        data = self.read()
        if data:
            yield data


@contextmanager
def offline_requests(service: str, region: str = "us-east-1", limit: int = CAPTURE_LIMIT,
                     session_token: str | None = None, **client_kwargs):
    """A real boto3 client whose every request is recorded and answered with a canned empty
    success, never sent. Yields ``(client, recorder)``."""
    client = boto3.client(service, region_name=region, aws_access_key_id=ACCESS_KEY,
                          aws_secret_access_key=SECRET_KEY, aws_session_token=session_token,
                          config=client_kwargs.pop("config", Config(retries={"max_attempts": 1})),
                          **client_kwargs)
    rec = Recorder(limit)
    protocol = client.meta.service_model.protocol

    def answer(request, **_):
        rec.requests.append(captured(request, limit))
        body = b"{}" if protocol in ("json", "rest-json") else b"<?xml version='1.0'?><R/>"
        return AWSResponse(request.url, 200, {"Content-Type": "application/json" if body == b"{}" else "text/xml"},
                           _Raw(body))

    client.meta.events.register("before-send", answer)
    yield client, rec


def call_offline(client, method: str, **kwargs) -> None:
    """Call ``method``; the canned answer may not parse as that operation's output, which does
    not matter here (the request was recorded before any parsing)."""
    try:
        getattr(client, method)(**kwargs)
    except Exception:  # noqa: BLE001 - only the request matters, never the canned response
        pass


WORKLOAD = Workload("research", "Deployment", "research-agent", "agent")
DAY = 86400.0


def recorded_profile(sessions: dict[str, list[tuple[float, str]]], workload: Workload = WORKLOAD,
                     fingerprints: dict[str, str] | None = None, quiet: float = 2 * DAY,
                     store=None) -> Profile:
    """A profile recorded through the real aggregator, as the sensor records one: each session
    (``session id → [(time, behaviour key)]``, in session-id order) bound to a cgroup of its own
    with the workload's fingerprints, its behaviours observed one by one, the session closed a
    second after its last one. The observation goes on ``quiet`` seconds after the last session
    without anything new (the window end), so coverage-stop is reached as it is after a quiet day
    of running. ``store`` (a :class:`ProfileStore`) gets the profile flushed to it."""
    last = max((ts for events in sessions.values() for ts, _ in events), default=0.0)
    clock = [last + quiet]
    agg = Aggregator("node-a", store, syscalls.name, clock=lambda: clock[0])
    for cgroup_id, sid in enumerate(sorted(sessions), start=1):
        events = sorted(sessions[sid])
        start = events[0][0] - 1.0 if events else last
        agg.bind(cgroup_id, workload, sid, start=start, fingerprints=fingerprints)
        for ts, key in events:
            assert agg.observe(cgroup_id, key, 1, ts), key
        agg.unbind(cgroup_id, end=(events[-1][0] if events else start) + 1.0)
    agg.flush()
    return agg.profile(workload)
