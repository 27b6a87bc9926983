"""The Kubernetes API client: the one home of Envelope's API plumbing.

* :func:`api_client`: the one client factory (in-cluster service account, else a kubeconfig,
  or an explicit host for tests). urllib3's own silent retries are off, so :func:`call_with_retry`
  is the one retry policy and every failed attempt is logged and counted.
* :class:`Backoff` and :func:`call_with_retry`: capped exponential backoff with jitter;
  transient failures (connection errors, 408, 429, 5xx) are retried, ``Retry-After`` honoured,
  permanent ones (other 4xx) raised at once.
* :class:`ClusterApiError`: the one error type for an API call that failed for good.
* :class:`TimedApi`: every call of a generated API class carries a request timeout, so a
  black-holed API server never holds a thread forever.
* :class:`Informer`: the one list+watch loop, on its own thread, into a store: lists (paged),
  then watches from the list's ``resourceVersion`` with bookmarks, relists on ``410 Gone``, and
  backs off on failures. Readers of its store never wait on the network.

Nothing here knows a resource's meaning: the pod watcher (:mod:`sensor.pods`), the profile
publisher (:mod:`sensor.workloadprofile`) and the policy client (:mod:`enforcer.leastprivilegepolicy`)
build on it. The composition root (``envelope/daemon.py``, the CLI commands) builds the client.
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar

import structlog

log = structlog.get_logger("envelope.kubeapi")

T = TypeVar("T")
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
#: (connect, read) seconds for every request; a black-holed API server must not hold a thread.
REQUEST_TIMEOUT = (5.0, 30.0)


class ClusterApiError(Exception):
    """A Kubernetes API call that failed for good (after retries, or with a permanent error)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


# ---- the client factory ------------------------------------------------------------------------


def api_client(kubeconfig: str | None = None, context: str | None = None, host: str | None = None):
    """A ``kubernetes`` ApiClient: ``host`` when given (no credentials), else in-cluster config
    inside a pod (unless a kubeconfig or context is named), else the kubeconfig. Raises
    :class:`ClusterApiError` when no configuration is found."""
    from kubernetes import client, config

    cfg = client.Configuration()
    if host:
        cfg.host = host
    else:
        loaded = False
        if kubeconfig is None and context is None:
            try:
                config.load_incluster_config(client_configuration=cfg)
                loaded = True
            except config.ConfigException:
                pass
        if not loaded:
            try:
                config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
            except (config.ConfigException, OSError, TypeError) as e:
                raise ClusterApiError(f"no Kubernetes API configuration (in-cluster or kubeconfig): {e}") from e
    cfg.retries = False
    return client.ApiClient(cfg)


class TimedApi:
    """A generated API object (``CoreV1Api``, ``CustomObjectsApi``...) whose calls all carry
    ``_request_timeout`` unless the caller gives one."""

    def __init__(self, api, timeout=REQUEST_TIMEOUT):
        self._api = api
        self._timeout = timeout

    def __getattr__(self, name: str):
        fn = getattr(self._api, name)
        if not callable(fn):
            return fn

        def call(*args, **kwargs):
            kwargs.setdefault("_request_timeout", self._timeout)
            return fn(*args, **kwargs)

        return call


# ---- backoff and retry -----------------------------------------------------------------------------


@dataclass
class Backoff:
    """Capped exponential backoff with jitter. ``sleep`` and ``jitter`` are injectable.

    ``attempts`` bounds :func:`call_with_retry`; loops that retry forever (the watch) take
    :meth:`delay` of their own attempt counter."""

    attempts: int = 5
    base: float = 0.5
    cap: float = 30.0
    sleep: Callable[[float], Any] = time.sleep
    jitter: Callable[[], float] = random.random

    def __post_init__(self) -> None:
        if self.base <= 0 or self.cap < self.base or self.attempts < 1:
            raise ValueError("backoff needs 0 < base <= cap and attempts >= 1")

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        d = min(self.cap, self.base * (2 ** min(attempt, 62))) * (0.5 + 0.5 * self.jitter())
        if retry_after is not None:
            d = max(d, min(retry_after, self.cap))
        return d


def status_of(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None)
    return int(status) if isinstance(status, int) else None


def _retry_after(exc: BaseException) -> float | None:
    headers = getattr(exc, "headers", None) or {}
    try:
        value = headers.get("Retry-After")
        return float(value) if value is not None else None
    except (TypeError, ValueError, AttributeError):
        return None


def is_retryable(exc: BaseException) -> bool:
    from kubernetes.client.exceptions import ApiException
    import urllib3.exceptions

    if isinstance(exc, ApiException):
        status = status_of(exc)
        return status is None or status == 0 or status in RETRYABLE_STATUS
    return isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError, OSError))


def describe(exc: BaseException) -> str:
    """One line for an API failure: ``HTTP 503 Service Unavailable`` or the exception."""
    status = status_of(exc)
    if status:
        return f"HTTP {status} {getattr(exc, 'reason', '') or ''}".strip()
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def call_with_retry(fn: Callable[[], T], what: str, backoff: Backoff | None = None,
                    on_retry: Callable[[str, BaseException], None] | None = None) -> T:
    """Run ``fn``; retry transient API failures with backoff; raise :class:`ClusterApiError`
    naming ``what`` once the attempts are spent or on a permanent error (4xx other than 408/429).
    ``on_retry`` is told of every failed attempt (the daemon counts them)."""
    backoff = backoff or Backoff()
    last: BaseException | None = None
    for attempt in range(max(1, backoff.attempts)):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below, never swallowed silently
            last = e
            if not is_retryable(e):
                raise ClusterApiError(f"{what}: {describe(e)}", status_of(e)) from e
            if on_retry is not None:
                on_retry(what, e)
            if attempt + 1 >= backoff.attempts:
                break
            delay = backoff.delay(attempt, _retry_after(e))
            log.warning("kube api call failed, retrying", call=what, attempt=attempt + 1,
                        status=status_of(e), error=describe(e)[:300], delay=round(delay, 3))
            backoff.sleep(delay)
    raise ClusterApiError(f"{what}: gave up after {backoff.attempts} attempts: {describe(last)}",
                          status_of(last) if last is not None else None) from last


def list_all(list_fn: Callable[..., Mapping], what: str, backoff: Backoff | None = None,
             on_retry: Callable[[str, BaseException], None] | None = None, page: int = 500,
             **kw) -> tuple[list[dict], str | None]:
    """Every item of a (paged) list call, and the list's ``resourceVersion``."""
    items: list[dict] = []
    token = None
    while True:
        args = dict(kw, limit=page)
        if token:
            args["_continue"] = token
        body = call_with_retry(lambda: list_fn(**args), what, backoff, on_retry)
        if not isinstance(body, Mapping):  # a raw response (_preload_content=False)
            body = json.loads(body.data)
        items += list(body.get("items") or [])
        meta = body.get("metadata") or {}
        token = meta.get("continue")
        if not token:
            return items, meta.get("resourceVersion")


# ---- list + watch ------------------------------------------------------------------------------------


class Gone(Exception):
    """The watch's resourceVersion is too old (HTTP 410): list again."""


def object_key(obj: Mapping) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def uid_key(obj: Mapping) -> str:
    return str((obj.get("metadata") or {}).get("uid") or "")


class Informer:
    """One resource's objects, kept current by list+watch on a daemon thread.

    ``list_fn`` is a generated list method (``CoreV1Api.list_pod_for_all_namespaces``, or
    ``functools.partial(CustomObjectsApi.list_cluster_custom_object, group, version, plural)``);
    ``selectors`` are passed to it (``field_selector``, ``label_selector``). ``on_event(type,
    obj, old)`` is called on the informer's thread for every change (``ADDED``, ``MODIFIED``,
    ``DELETED``; a relist reports the differences the same way); ``on_error(what, exc)`` for
    every failed call. Reads (:meth:`get`, :meth:`items`) never touch the network."""

    def __init__(self, name: str, list_fn: Callable[..., Any], *, key: Callable[[Mapping], Any] = object_key,
                 selectors: Mapping[str, str] | None = None, backoff: Backoff | None = None,
                 watch_timeout: int = 300, request_timeout=REQUEST_TIMEOUT,
                 on_event: Callable[[str, dict, dict | None], None] | None = None,
                 on_error: Callable[[str, BaseException], None] | None = None):
        self.name = name
        self.list_fn = list_fn
        self.key = key
        self.selectors = dict(selectors or {})
        self.backoff = backoff or Backoff()
        self.watch_timeout = watch_timeout
        self.request_timeout = request_timeout
        self.on_event = on_event
        self.on_error = on_error
        self._lock = threading.Lock()
        self._objects: dict[Any, dict] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._resp = None
        self.synced = threading.Event()  # set after the first successful list
        self.generation = 0  # bumped on every change
        self.resource_version: str | None = None
        self.failures = 0
        self.relists = 0
        self.last_error: str | None = None

    # -- lifecycle --

    def start(self) -> "Informer":
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name=f"kube-watch-{self.name}", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        resp = self._resp
        if resp is not None:  # unblock a watch waiting for its next event
            try:
                resp.close()
            except Exception:  # noqa: BLE001
                pass
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- reads (never touch the network) --

    def get(self, key) -> dict | None:
        with self._lock:
            return self._objects.get(key)

    def items(self) -> list[dict]:
        with self._lock:
            return list(self._objects.values())

    # -- the loop --

    def _loop(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                if self.resource_version is None:
                    self._list()
                self._watch()
                attempt = 0
            except Gone:
                self.resource_version = None
                self.relists += 1
            except Exception as e:  # noqa: BLE001 - the loop must survive anything the API does
                if self._stop.is_set():
                    break
                self._failed(f"list/watch {self.name}", e)
                self._stop.wait(self.backoff.delay(attempt))
                attempt += 1

    def _failed(self, what: str, e: BaseException) -> None:
        self.failures += 1
        self.last_error = f"{what}: {describe(e)}"
        try:
            log.warning("kubernetes api call failed", call=what, error=self.last_error, failures=self.failures)
        except Exception:  # noqa: BLE001 - a broken log sink must not stop the thread
            pass
        if self.on_error is not None:
            try:
                self.on_error(what, e)
            except Exception:  # noqa: BLE001
                pass

    def _call(self, **kw):
        return self.list_fn(**self.selectors, _preload_content=False, **kw)

    def _list(self) -> None:
        items, rv = list_all(lambda **kw: self._call(_request_timeout=self.request_timeout, **kw),
                             f"list {self.name}", Backoff(attempts=1))
        fresh = {self.key(o): o for o in items}
        with self._lock:
            old = self._objects
            self._objects = fresh
            self.generation += 1
        self.resource_version = rv
        for k in sorted(set(old) - set(fresh), key=str):
            self._emit("DELETED", old[k], old[k])
        for k, o in fresh.items():
            prev = old.get(k)
            if prev is None:
                self._emit("ADDED", o, None)
            elif (prev.get("metadata") or {}).get("resourceVersion") != (o.get("metadata") or {}).get("resourceVersion"):
                self._emit("MODIFIED", o, prev)
        self.synced.set()

    def _watch(self) -> None:
        from kubernetes.watch.watch import iter_resp_lines

        connect = self.request_timeout[0] if isinstance(self.request_timeout, tuple) else self.request_timeout
        try:
            resp = self._call(watch=True, resource_version=self.resource_version, allow_watch_bookmarks=True,
                              timeout_seconds=self.watch_timeout,
                              _request_timeout=(connect, self.watch_timeout + 30))
        except Exception as e:  # noqa: BLE001
            if status_of(e) == 410:  # some servers refuse the watch itself instead of sending an event
                raise Gone(str(e)) from e
            raise
        self._resp = resp
        try:
            for line in iter_resp_lines(resp):
                if self._stop.is_set():
                    return
                if line.strip():
                    self.apply_event(json.loads(line))
        finally:
            self._resp = None
            try:
                resp.release_conn()
            except Exception:  # noqa: BLE001
                pass

    def apply_event(self, event: Mapping) -> None:
        """Apply one watch event (``{"type": ..., "object": {...}}``) to the store."""
        etype = event.get("type")
        obj = dict(event.get("object") or {})
        if etype == "ERROR":
            if obj.get("code") == 410:
                raise Gone(obj.get("message", "resource version too old"))
            raise ClusterApiError(f"watch {self.name}: {obj.get('message', obj)}", obj.get("code"))
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if rv:
            self.resource_version = rv
        if etype == "BOOKMARK":
            return
        k = self.key(obj)
        with self._lock:
            old = self._objects.get(k)
            if etype == "DELETED":
                self._objects.pop(k, None)
            else:
                self._objects[k] = obj
            self.generation += 1
        self._emit(str(etype), obj, old)

    def _emit(self, etype: str, obj: dict, old: dict | None) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(etype, obj, old)
        except Exception as e:  # noqa: BLE001 - a consumer's bug must not stop the watch
            log.error("watch event handler failed", informer=self.name, error=f"{type(e).__name__}: {e}")
