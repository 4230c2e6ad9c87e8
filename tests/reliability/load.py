"""A bounded intake load: client threads submitting deletion requests, each with its own
Idempotency-Key, remembering which ones the API acknowledged. A request that gets no answer
(the server died mid-request, or is down, or answered 503) is sent again with the same key and
body until acknowledged, as a careful client would: one committed before a crash comes back as
a replay of the original."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

URL = "/v1/deletion-requests"


@dataclass
class Intake:
    base_url: str
    headers: dict[str, str]
    subjects: list[str]
    threads: int = 6
    limit: int = 600  # requests issued at most, across threads
    acknowledged: dict[str, str] = field(default_factory=dict)  # key -> request id
    replayed: set[str] = field(default_factory=set)  # keys acknowledged as a replay
    unanswered: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> body
    interrupted: set[str] = field(default_factory=set)  # keys whose request lost its answer
    statuses: dict[int, int] = field(default_factory=dict)  # non-2xx answers seen
    issued: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers = [threading.Thread(target=self._run, args=(n,), daemon=True)
                         for n in range(self.threads)]

    def start(self) -> Intake:
        for worker in self._workers:
            worker.start()
        return self

    def stop(self, timeout: float = 60) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout)

    def wait_for(self, acknowledged: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acknowledged) < acknowledged:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {len(self.acknowledged)} of {acknowledged} "
                                     f"requests acknowledged in {timeout}s: {self.statuses}")
            time.sleep(0.05)

    def _next(self, thread: int) -> tuple[str, dict[str, Any]] | None:
        with self._lock:
            if self.issued >= self.limit:
                return None
            self.issued += 1
            n = self.issued
        return f"load-{thread}-{n}", {"kind": "subject",
                                      "subject_ref": self.subjects[n % len(self.subjects)]}

    def _run(self, thread: int) -> None:
        with httpx.Client(base_url=self.base_url, timeout=30) as client:
            while not self._stop.is_set():
                work = self._next(thread)
                if work is None:
                    return
                while not self.send(client, *work) and not self._stop.is_set():
                    time.sleep(0.1)  # down or busy: retry the same request, without spinning

    def send(self, client: httpx.Client, key: str, body: dict[str, Any]) -> bool:
        try:
            response = client.post(URL, json=body,
                                   headers={**self.headers, "Idempotency-Key": key})
        except httpx.TransportError:
            with self._lock:
                self.unanswered[key] = body
                self.interrupted.add(key)
            return False
        with self._lock:
            if response.is_success:
                self.acknowledged[key] = response.json()["id"]
                self.unanswered.pop(key, None)
                if response.headers.get("Idempotent-Replayed") == "true":
                    self.replayed.add(key)
                return True
            self.statuses[response.status_code] = self.statuses.get(response.status_code,
                                                                    0) + 1
            self.unanswered[key] = body
        return False

    def resend_unanswered(self, timeout: float = 120) -> None:
        """Send every request still unanswered (the load stopped while it was retried)."""
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.base_url, timeout=30) as client:
            while self.unanswered:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{len(self.unanswered)} requests never acknowledged")
                for key, body in list(self.unanswered.items()):
                    self.send(client, key, body)
