"""Alert hooks: they only deliver.

Three kinds, several at once (see the ``hooks`` section of the config):

- :class:`WebhookHook`: HTTP POST of the JSON alert; header
  ``X-Reloop-Signature`` = hex HMAC-SHA256 of the exact body bytes with a
  secret read from an environment variable (a hook without one is warned
  about); one total deadline per delivery; retries with exponential backoff
  on connection errors, timeouts, 5xx, 408 and 429 (other 4xx are final:
  retrying would not help); redirects are refused, never followed;
- :class:`KafkaHook`: the alert (and every audit record) as JSON on the
  alerts topic (``reloop.alerts``);
- :class:`PythonHook`: a ``module:function`` entry point called with the alert dict.

:class:`HookDispatcher` fans a payload out to every hook. A hook that fails
(raises, times out, stays down) never raises into the monitor loop: the
payload goes to the dead-letter JSONL log with the reason, and monitoring
continues. With ``background=True`` each hook has its own queue and worker
thread, so a slow endpoint stalls neither monitoring nor the other hooks, and
``close()`` dead-letters whatever it could not deliver in time.

Configuration (YAML; the secret itself only ever lives in the environment)::

    hooks:
      webhooks:
        - url: https://oncall.example.com/reloop
          secret_env: RELOOP_WEBHOOK_SECRET
          timeout_s: 5
          retries: 3          # after the first attempt
          backoff_s: 0.5      # 0.5, 1, 2, ... capped at backoff_max_s
      kafka_enabled: true     # on kafka.alerts_topic (reloop.alerts)
      python: ["mypkg.alerts:page_oncall"]
      dead_letter_path: .state/alerts.deadletter.jsonl

The body carries ``id`` and ``created_at``, so a receiver can also drop
replayed deliveries. Receivers verify a delivery with :func:`verify`:

>>> body = b'{"detector":"adwin:logloss"}'
>>> sig = sign(body, b"s3cret")
>>> len(sig), verify(body, b"s3cret", sig), verify(body + b" ", b"s3cret", sig)
(64, True, False)
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import importlib
import json
import logging
import os
import queue
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from online_models.errors import ReloopError
from pipelines.kafka_io import producer

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Reloop-Signature"
RETRYABLE_STATUS = frozenset({408, 429})


class HookError(ReloopError, ValueError):
    """A hook that cannot be set up (missing secret variable, bad entry point); names the setting."""


def encode_body(payload: Mapping[str, Any]) -> bytes:
    """The canonical JSON bytes that are sent and signed (sorted keys, no spaces, strict JSON)."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False, default=str).encode()


def sign(body: bytes, secret: bytes) -> str:
    """Hex HMAC-SHA256 of ``body``."""
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(body: bytes, secret: bytes, signature: str) -> bool:
    """Constant-time check of an ``X-Reloop-Signature`` header."""
    return hmac.compare_digest(sign(body, secret), signature or "")


@dataclass
class DeliveryResult:
    hook: str
    ok: bool
    attempts: int = 1
    error: str | None = None
    status: int | None = None
    #: seconds slept between attempts (the backoff schedule actually used)
    backoffs: list[float] = field(default_factory=list)


class Hook(Protocol):
    name: str
    #: whether audit records (not only alerts) go to this hook
    accepts_records: bool

    def deliver(self, payload: Mapping[str, Any]) -> DeliveryResult: ...


class DeadLetterLog:
    """Append-only JSONL of payloads that no retry could deliver, with the reason. Never raises."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def write(self, result: DeliveryResult, payload: Mapping[str, Any], target: str | None = None) -> None:
        line = {
            "dead_lettered_at": time.time(),
            "hook": result.hook,
            "target": target,
            "error": result.error,
            "status": result.status,
            "attempts": result.attempts,
            "payload": payload,
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._lock, self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(line, sort_keys=True, default=str) + "\n")
        except OSError as e:  # the last line of defence must not take the monitor down
            log.error("dead-letter log %s not writable (%s); lost alert %s", self.path, e, payload.get("id"))

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open(encoding="utf-8") as f:
            return [json.loads(x) for x in f if x.strip()]


class WebhookHook:
    """POST the alert as signed JSON, with retries with exponential backoff, all within one deadline.

    Redirects are never followed (a 3xx is a final failure): following one would send the signature to
    another host. ``deadline_s`` bounds the whole delivery (every attempt, read and backoff), not one
    socket read: a slow-trickling endpoint is cut off by closing its connection. Without a secret the
    hook still works, with a warning: receivers then cannot tell its alerts from forged ones.
    """

    accepts_records = False

    def __init__(
        self,
        url: str,
        secret_env: str | None = None,
        timeout_s: float = 5.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        backoff_max_s: float = 30.0,
        *,
        secret: bytes | None = None,
        sleep: Callable[[float], None] = time.sleep,
        environ: Mapping[str, str] | None = None,
        deadline_s: float | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise HookError(f"webhook url must start with http:// or https://, got {url!r}")
        if secret is None and secret_env:
            value = (os.environ if environ is None else environ).get(secret_env)
            if not value:
                raise HookError(f"webhook {url}: environment variable {secret_env} (secret_env) is not set")
            secret = value.encode()
        if secret is None:
            log.warning("webhook %s has no secret (secret_env): its alerts are unsigned and can be forged", url)
        self.url, self.secret_env, self.secret = url, secret_env, secret
        self.timeout_s, self.retries, self.backoff_s, self.backoff_max_s = timeout_s, retries, backoff_s, backoff_max_s
        #: the whole delivery, all attempts included (default: one timeout per attempt)
        self.deadline_s = deadline_s if deadline_s is not None else timeout_s * (retries + 1)
        self.name = f"webhook:{url}"
        self._sleep = sleep

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (0-based)."""
        return min(self.backoff_s * (2**attempt), self.backoff_max_s)

    def deliver(self, payload: Mapping[str, Any]) -> DeliveryResult:
        body = encode_body(payload)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "reloop-alerts/1",
            "X-Reloop-Delivery": str(payload.get("id", "")),
        }
        if self.secret is not None:
            headers[SIGNATURE_HEADER] = sign(body, self.secret)
        result = DeliveryResult(self.name, False, 0)
        end = time.monotonic() + self.deadline_s
        for attempt in range(self.retries + 1):
            remaining = end - time.monotonic()
            if remaining <= 0:
                result.error = f"deadline of {self.deadline_s:g}s passed ({result.error})"
                break
            result.attempts = attempt + 1
            status, error = self._attempt(body, headers, min(self.timeout_s, remaining))
            result.status = status
            if status is not None and 200 <= status < 300:
                result.ok, result.error = True, None
                return result
            result.error = error
            retry = status is None or status >= 500 or status in RETRYABLE_STATUS
            if not retry or attempt == self.retries:
                break
            wait = min(self.backoff(attempt), max(0.0, end - time.monotonic()))
            result.backoffs.append(wait)
            self._sleep(wait)
        return result

    def _attempt(self, body: bytes, headers: dict[str, str], budget_s: float) -> tuple[int | None, str | None]:
        """One POST that takes at most ``budget_s`` in total: ``(status or None, error)``.

        Runs on a helper thread; at the budget the connection is closed under it, which ends any read.
        """

        u = urllib.parse.urlsplit(self.url)
        conn_cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        conn = conn_cls(u.hostname, u.port, timeout=budget_s)
        out: dict[str, Any] = {}

        def run() -> None:
            try:
                conn.request("POST", (u.path or "/") + (f"?{u.query}" if u.query else ""), body=body, headers=headers)
                resp = conn.getresponse()
                resp.read(64 * 1024)  # bounded: the answer is not needed, only its status
                out["status"], out["reason"] = resp.status, resp.reason
                out["location"] = resp.getheader("Location")
            except Exception as e:  # noqa: BLE001  (reported as this attempt's error)
                out["error"] = f"{type(e).__name__}: {e}"

        t = threading.Thread(target=run, name="webhook-attempt", daemon=True)
        t.start()
        t.join(budget_s)
        if t.is_alive():
            try:
                if conn.sock is not None:
                    conn.sock.shutdown(2)
            except OSError:
                pass
            conn.close()
            t.join(1.0)
            return None, f"TimeoutError: timed out (no complete answer within {budget_s:.2f}s)"
        conn.close()
        if "status" not in out:
            return None, out.get("error", "no answer")
        status = out["status"]
        if 300 <= status < 400:
            return status, f"HTTP {status}: redirect to {out.get('location')!r} refused (not followed)"
        return status, None if 200 <= status < 300 else f"HTTP {status} {out.get('reason')}"


class KafkaHook:
    """Publish alerts and audit records as JSON on a Kafka topic (key = detector or record kind)."""

    accepts_records = True

    def __init__(self, kafka_cfg: Any, topic: str, send_timeout_s: float = 10.0) -> None:
        self.kafka_cfg, self.topic, self.send_timeout_s = kafka_cfg, topic, send_timeout_s
        self.name = f"kafka:{topic}"
        self._producer = None
        self._lock = threading.Lock()

    def deliver(self, payload: Mapping[str, Any]) -> DeliveryResult:

        key = str(payload.get("detector") or payload.get("kind") or payload.get("action") or "alert").encode()
        with self._lock:
            try:
                if self._producer is None:
                    ms = int(self.send_timeout_s * 1000)  # a down broker costs this much, not 30 s
                    self._producer = producer(self.kafka_cfg, linger_ms=0, max_block_ms=ms, bootstrap_timeout_ms=ms)
                self._producer.send(self.topic, key=key, value=encode_body(payload)).get(timeout=self.send_timeout_s)
                return DeliveryResult(self.name, True)
            except Exception as e:  # broker down, auth, timeout: a fresh producer next time
                self._close()
                return DeliveryResult(self.name, False, error=f"{type(e).__name__}: {e}")

    def _close(self) -> None:
        if self._producer is not None:
            try:
                self._producer.close(timeout=1)
            except Exception:  # noqa: BLE001 - closing a broken producer may fail too; nothing to do
                pass
            self._producer = None

    def close(self) -> None:
        with self._lock:
            self._close()


def resolve_entry_point(spec: str) -> Callable[[dict[str, Any]], Any]:
    """``package.module:function`` (or ``module:Class.method``) -> the callable.

    >>> resolve_entry_point("json:dumps")({"a": 1})
    '{"a": 1}'
    """
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise HookError(f"python hook {spec!r}: expected 'module:function'")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as e:
        raise HookError(f"python hook {spec!r}: cannot import {module}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise HookError(f"python hook {spec!r}: {module} has no attribute {attr}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise HookError(f"python hook {spec!r}: {attr} is not callable")
    return obj


class PythonHook:
    """Call a Python function with the alert dict (an entry point string or a callable)."""

    def __init__(self, target: str | Callable[[dict[str, Any]], Any], accepts_records: bool = False) -> None:
        self.fn = resolve_entry_point(target) if isinstance(target, str) else target
        self.name = f"python:{target if isinstance(target, str) else getattr(target, '__qualname__', target)}"
        self.accepts_records = accepts_records

    def deliver(self, payload: Mapping[str, Any]) -> DeliveryResult:
        self.fn(dict(payload))
        return DeliveryResult(self.name, True)


class HookDispatcher:
    """Deliver a payload to every hook; failures go to the dead-letter log, never up.

    >>> import tempfile, os
    >>> dl = DeadLetterLog(os.path.join(tempfile.mkdtemp(), "dl.jsonl"))
    >>> def broken(alert): raise RuntimeError("pager down")
    >>> seen = []
    >>> d = HookDispatcher([PythonHook(broken), PythonHook(seen.append)], dl)
    >>> [r.ok for r in d.deliver({"id": "a1", "detector": "adwin:logloss"})]
    [False, True]
    >>> len(seen), dl.read()[0]["error"], d.stats["dead_lettered"]
    (1, "RuntimeError('pager down')", 1)
    """

    def __init__(
        self,
        hooks: Iterable[Hook],
        dead_letter: DeadLetterLog | None = None,
        background: bool = False,
        queue_size: int = 10_000,
    ) -> None:
        self.hooks = list(hooks)
        self.dead_letter = dead_letter
        self.background = background
        self.stats = {"delivered": 0, "failed": 0, "dead_lettered": 0, "queued": 0}
        self._stats_lock = threading.Lock()
        # one queue and one worker per hook: a slow hook never starves the others
        self._queues: list[queue.Queue] = []
        self._threads: list[threading.Thread] = []
        if background:
            for i, hook in enumerate(self.hooks):
                q: queue.Queue = queue.Queue(maxsize=queue_size)
                t = threading.Thread(target=self._work, args=(hook, q), name=f"reloop-hook-{i}", daemon=True)
                t.start()
                self._queues.append(q)
                self._threads.append(t)

    def deliver(self, payload: Mapping[str, Any], record: bool = False) -> list[DeliveryResult] | None:
        """Send an alert (or, with ``record=True``, an audit record to the hooks that take records).

        Returns the results, or None when queued for the background workers.
        """
        if not self.background:
            return self._deliver_now(payload, record)
        for hook, q in zip(self.hooks, self._queues):
            if record and not hook.accepts_records:
                continue
            try:
                q.put_nowait((payload, record))
                self._count("queued")
            except queue.Full:
                self._dead(DeliveryResult(hook.name, False, 0, "delivery queue full"), payload, _target(hook))
        return None

    def _deliver_now(self, payload: Mapping[str, Any], record: bool) -> list[DeliveryResult]:
        return [r for r in (self._deliver_one(h, payload, record) for h in self.hooks) if r is not None]

    def _deliver_one(self, hook: Hook, payload: Mapping[str, Any], record: bool) -> DeliveryResult | None:
        if record and not hook.accepts_records:
            return None
        try:
            res = hook.deliver(payload)
        except Exception as e:  # a failing hook never stops monitoring
            res = DeliveryResult(hook.name, False, 1, repr(e))
        if res.ok:
            self._count("delivered")
        else:
            self._count("failed")
            self._dead(res, payload, _target(hook))
        return res

    def _dead(self, res: DeliveryResult, payload: Mapping[str, Any], target: str | None) -> None:
        log.warning(
            "alert %s not delivered by %s after %d attempt(s): %s", payload.get("id"), res.hook, res.attempts, res.error
        )
        if self.dead_letter is not None:
            self.dead_letter.write(res, payload, target)
            self._count("dead_lettered")

    def _count(self, key: str) -> None:
        with self._stats_lock:
            self.stats[key] += 1

    def _work(self, hook: Hook, q: queue.Queue) -> None:
        while True:
            item = q.get()
            try:
                if item is None:
                    return
                self._deliver_one(hook, *item)
            except Exception:  # noqa: BLE001 - keep the worker alive whatever happens
                log.exception("hook worker error")
            finally:
                q.task_done()

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until queued payloads are delivered (or dead-lettered); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while any(q.unfinished_tasks for q in self._queues):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self, timeout_s: float = 30.0) -> None:
        """Deliver what is queued within ``timeout_s``; whatever is still undelivered then is dead-lettered
        (reason ``undelivered at close``), never silently dropped."""
        self.flush(timeout_s)
        for hook, q in zip(self.hooks, self._queues):
            while True:
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    self._dead(DeliveryResult(hook.name, False, 0, "undelivered at close"), item[0], _target(hook))
                q.task_done()
            try:
                q.put_nowait(None)
            except queue.Full:
                pass
        for hook, t in zip(self.hooks, self._threads):
            # a worker still inside a delivery ends at that delivery's own deadline, then dead-letters it
            t.join(float(getattr(hook, "deadline_s", 1.0)) + 0.5)
        for hook in self.hooks:
            close = getattr(hook, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001
                    log.exception("closing %s", hook.name)


def _target(hook: Any) -> str | None:
    return getattr(hook, "url", getattr(hook, "topic", None))


def dispatcher_from_config(
    cfg: Any, callbacks: Iterable[Callable[[dict[str, Any]], Any]] = (), background: bool | None = None
) -> HookDispatcher:
    """Build the hooks of a :class:`reloop.config.ReloopConfig` (plus in-process callbacks)."""
    h = cfg.hooks
    hooks: list[Any] = [
        WebhookHook(w.url, w.secret_env, w.timeout_s, w.retries, w.backoff_s, w.backoff_max_s) for w in h.webhooks
    ]
    if h.kafka_enabled:
        hooks.append(KafkaHook(cfg.kafka, h.kafka_topic or cfg.kafka.alerts_topic))
    hooks += [PythonHook(ep) for ep in h.python]
    hooks += [PythonHook(cb, accepts_records=True) for cb in callbacks]
    return HookDispatcher(hooks, DeadLetterLog(h.dead_letter_path), h.background if background is None else background)
