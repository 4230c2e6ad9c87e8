"""Hostile input through a real server (uvicorn on PostgreSQL, over a socket): what
tests/api covers in-process, made harder. Bodies that lie about their length or never end,
weights files built to crash or execute, locators and store names that try to leave the
store, NaN and infinity smuggled in binary, and a manifest of a million rows streamed in while
the server's memory is watched. Every refusal is a 4xx problem body; nothing is left behind."""

from __future__ import annotations

import base64
import json
import os
import pickle
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.api.seed import MLP, jsonl
from tests.reliability.deploy import SMALL_MODEL, make_keys, seed_small_model
from tests.worker.services import Services
from unlearning.architectures import build_model
from unlearning.data.store import write_shard

pytestmark = [pytest.mark.reliability, pytest.mark.postgres, pytest.mark.slow]

OCTET = {"Content-Type": "application/octet-stream"}
NDJSON = {"Content-Type": "application/x-ndjson"}
MANIFEST_ROWS = 1_000_000
UPLOAD_LIMIT = 192 << 20  # the server's limit for weights and manifests: above the manifest
# Peak resident memory the server may gain while a million-row manifest (~100 MB) streams
# through it: a server holding the body, or the rows, would gain several times the body.
MANIFEST_RSS_GROWTH = 64 << 20


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"] == "application/problem+json", response.headers
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["detail"]
    return body


class Server:
    def __init__(self, services: Services, data_dir: Path, headers: dict[str, dict[str, str]]
                 ) -> None:
        self.services, self.data_dir, self.headers = services, data_dir, headers
        self.api = httpx.Client(base_url=services.base_url, timeout=120)

    @property
    def operator(self) -> dict[str, str]:
        return self.headers["operator"]

    @property
    def pid(self) -> int:
        return self.services.processes["api"].pid

    def _status(self, field: str) -> int:
        status = Path(f"/proc/{self.pid}/status").read_text()
        kilobytes = next(line.split()[1] for line in status.splitlines()
                         if line.startswith(f"{field}:"))
        return int(kilobytes) * 1024

    def peak_rss(self) -> int:
        """The server process's peak resident set size so far (VmHWM), in bytes."""
        return self._status("VmHWM")

    def reset_peak_rss(self) -> None:
        """Start VmHWM again from the current RSS (Linux: write 5 to clear_refs)."""
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        assert self.peak_rss() - self._status("VmRSS") < 16 << 20, "VmHWM was not reset"

    def artifacts(self) -> list[Path]:
        root = self.data_dir / "artifacts"
        return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, postgres_template: str
           ) -> Iterator[Server]:
    from sqlalchemy import create_engine, text

    from tests.conftest import POSTGRES_ADMIN_URL, _database_url

    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"lethe_hostile_{os.getpid()}_{int(time.time())}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{postgres_template}"'))
    url = _database_url(POSTGRES_ADMIN_URL, name)
    root = tmp_path_factory.mktemp("hostile")
    services = Services({"LETHE_DATABASE_URL": url, "LETHE_BROKER_URL": "memory://",
                         "LETHE_DATA_DIR": str(root / "data"), "LETHE_SECRET_KEY": "hostile",
                         "LETHE_ACCESS_LOG": "false", "LETHE_MAX_BODY_BYTES": str(64 << 10),
                         "LETHE_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT)}, root)
    try:
        services.start_api()
        hosted = Server(services, root / "data", make_keys(url))
        seed_small_model(hosted.api, hosted.operator)
        yield hosted
        hosted.api.close()
    finally:
        services.stop_all()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# ---- a million-row manifest -------------------------------------------------------------


def million_rows() -> Iterator[bytes]:
    """The manifest as it would come off a disk: generated in 1 MiB-ish pieces, never whole."""
    lines: list[str] = []
    for n in range(MANIFEST_ROWS):
        lines.append(f'{{"sample_key":"m-{n:07d}","subject_ref":"person-{n // 8}",'
                     f'"label":{n % 10},"split":"{"train" if n % 5 else "holdout"}",'
                     f'"locator":"shard-{n // 10000:03d}.safetensors#{n % 10000}"}}\n')
        if len(lines) == 8192:
            yield "".join(lines).encode()
            lines.clear()
    yield "".join(lines).encode()


def write_million_shards(store: Path) -> None:
    """The shards the million rows point into (each row is checked against its shard)."""
    per_shard = 10_000
    for shard in range(MANIFEST_ROWS // per_shard):
        first = shard * per_shard
        write_shard(store / f"shard-{shard:03d}.safetensors",
                    torch.zeros(per_shard, 1, 8, 8, dtype=torch.uint8),
                    torch.arange(first, first + per_shard) % 10,
                    [f"m-{n:07d}" for n in range(first, first + per_shard)])


def test_a_million_row_manifest_streams_in_with_bounded_server_memory(server: Server) -> None:
    api = server.api
    assert api.post("/v1/datasets", json={"name": "million"},
                    headers=server.operator).status_code == 201
    write_million_shards(server.data_dir / "datasets" / "million")
    body_bytes = sum(len(chunk) for chunk in million_rows())
    server.reset_peak_rss()
    before = server.peak_rss()
    started = time.monotonic()
    response = api.post("/v1/datasets/million/samples", content=million_rows(),
                        headers={**server.operator, **NDJSON}, timeout=900)
    seconds = time.monotonic() - started
    growth = server.peak_rss() - before
    assert response.status_code == 201, response.text
    assert response.json() == {"dataset": "million", "inserted": MANIFEST_ROWS,
                               "with_subject": MANIFEST_ROWS}
    counts = api.get("/v1/datasets/million", headers=server.operator).json()["samples"]
    assert counts == {"train": 800_000, "holdout": 200_000, "test": 0, "forgotten": 0}
    print(f"\n{MANIFEST_ROWS} rows ({body_bytes / 2**20:.0f} MiB) in {seconds:.0f}s; the "
          f"server's peak RSS grew {growth / 2**20:.1f} MiB")
    assert growth < MANIFEST_RSS_GROWTH < body_bytes


def endless_line(total: int) -> Iterator[bytes]:
    """``total`` bytes of one line that never ends."""
    chunk = b"a" * (1 << 20)
    for _ in range(total // len(chunk)):
        yield chunk


@pytest.mark.parametrize("content_type", ["application/x-ndjson", "text/csv"])
def test_a_manifest_that_is_one_endless_line_is_refused_with_bounded_memory(
        server: Server, content_type: str) -> None:
    api = server.api
    name = "endless-" + content_type.split("/")[1].replace("x-", "")
    assert api.post("/v1/datasets", json={"name": name},
                    headers=server.operator).status_code == 201
    prefix = [b"sample_key,label,split,locator\n"] if content_type == "text/csv" else []
    server.reset_peak_rss()
    before = server.peak_rss()
    response = api.post(f"/v1/datasets/{name}/samples",
                        content=iter([*prefix, *endless_line(128 << 20)]),
                        headers={**server.operator, "Content-Type": content_type})
    growth = server.peak_rss() - before
    body = problem(response, 422)
    assert body["line"] == (2 if prefix else 1), body
    assert growth < MANIFEST_RSS_GROWTH, f"peak RSS grew {growth / 2**20:.0f} MiB"


# ---- bodies past the limits ---------------------------------------------------------------


def raw_exchange(port: int, head: bytes, chunks: Iterator[bytes], *, timeout: float = 30
                 ) -> tuple[int, bytes, int]:
    """Send a request head and then body chunks until the server answers or closes; returns
    (status, response bytes, body bytes sent). A server that reads a refused body to its end
    would make this run until ``chunks`` ends."""
    import select

    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(head)
        for chunk in chunks:
            readable, _, _ = select.select([connection], [], [], 0)
            if readable:
                break
            try:
                connection.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        answer = b""
        connection.settimeout(timeout)
        while b"\r\n\r\n" not in answer or len(answer) < answer.index(b"\r\n\r\n") + 200:
            try:
                data = connection.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not data:
                break
            answer += data
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1") else 0
    return status, answer, sent


def chunked(total: int, piece: int = 1 << 16) -> Iterator[bytes]:
    data = b"\x00" * piece
    for _ in range(total // piece):
        yield f"{piece:x}\r\n".encode() + data + b"\r\n"
    yield b"0\r\n\r\n"


def test_bodies_past_the_limits_are_413_before_the_server_reads_them(server: Server) -> None:
    port, auth = server.services.port, server.operator["Authorization"]
    versions = f"/v1/models/{SMALL_MODEL}/versions"
    # A declared length past the upload limit: refused before a byte of the body is sent.
    head = (f"POST {versions} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {10 << 30}\r\n\r\n")
    started = time.monotonic()
    status, answer, sent = raw_exchange(port, head.encode(), iter([]))
    assert status == 413 and b"application/problem+json" in answer, answer[:300]
    assert time.monotonic() - started < 10
    # Chunked, no length: the server stops at the limit, not at the end of the stream.
    head = (f"POST {versions} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n"
            "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    status, answer, sent = raw_exchange(port, head.encode(), chunked(UPLOAD_LIMIT * 4))
    assert status == 413 and b"application/problem+json" in answer, answer[:300]
    assert sent < UPLOAD_LIMIT * 2, f"the server read {sent} bytes of a refused upload"
    # A JSON body that never ends, on a route with the small limit.
    head = (f"POST /v1/deletion-requests HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    endless_json = iter([b'5\r\n{"a":\r\n', *chunked(256 << 20)])
    status, answer, sent = raw_exchange(port, head.encode(), endless_json)
    assert status == 413 and b"application/problem+json" in answer, answer[:300]
    assert sent < 64 << 20
    # Nothing half-uploaded is left behind, and no version appeared.
    assert server.artifacts() == []
    assert server.api.get(versions, headers=server.operator).json() == []


# ---- weights built to crash or execute ----------------------------------------------------


class Payload:
    """Unpickling this creates a file: the proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def hostile_weights(tmp_path: Path, marker: Path) -> dict[str, bytes]:
    state = {k: v.contiguous() for k, v in build_model(MLP).state_dict().items()}
    save_file(state, str(tmp_path / "good.safetensors"))
    good = (tmp_path / "good.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8:8 + length])

    def with_header(changed: object, data: bytes = good[8 + length:]) -> bytes:
        """A file whose header is ``changed`` as JSON: a dict, or anything else JSON holds."""
        raw = json.dumps(changed).encode()
        return struct.pack("<Q", len(raw)) + raw + data

    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({**state, "payload": Payload(marker)}, checkpoint)
    first = next(k for k in header if k != "__metadata__")
    return {
        "pickle": pickle.dumps({"weight": Payload(marker)}),
        "pickle protocol 0": pickle.dumps(Payload(marker), protocol=0),
        "torch.save checkpoint (zip + pickle)": checkpoint.read_bytes(),
        "pickle behind a plausible header length": struct.pack("<Q", 64)
        + pickle.dumps(Payload(marker)),
        "header length past the file": struct.pack("<Q", 1 << 20) + b"{}",
        "header length of 2^63": struct.pack("<Q", 1 << 63) + b"{}",
        "header not JSON": struct.pack("<Q", 4) + b"\xff\xfe\x00\x01",
        "header a list": with_header([1, 2]),
        "nested header bomb": struct.pack("<Q", 400_000) + b"[" * 200_000 + b"]" * 200_000,
        "tensor bytes missing": good[:8 + length],
        "offsets overlapping": with_header({**header, first: {
            **header[first], "data_offsets": [0, 4]}}),
        "a shape of 2^62 elements": with_header({**header, first: {
            **header[first], "shape": [1 << 62]}}),
        "dtype it does not hold": with_header({**header, first: {
            **header[first], "dtype": "F16"}}),
        "metadata not an object": with_header({**header, "__metadata__": [1]}),
        "a safetensors shard of images instead": with_header(
            {"x": {"dtype": "U8", "shape": [1, 1], "data_offsets": [0, 1]}}, b"\x00"),
    }


def test_weights_built_to_crash_or_execute_are_422_and_never_loaded(
        server: Server, tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    versions = f"/v1/models/{SMALL_MODEL}/versions"
    answers = {}
    for name, body in hostile_weights(tmp_path, marker).items():
        response = server.api.post(versions, content=body,
                                   headers={**server.operator, **OCTET})
        answers[name] = response.status_code
        if response.status_code == 422:
            problem(response, 422)
    assert all(status == 422 for status in answers.values()), answers
    assert not marker.exists(), "a pickle was executed"
    assert server.api.get(versions, headers=server.operator).json() == []
    assert server.artifacts() == []  # staging cleaned after every refusal


# ---- leaving the store ----------------------------------------------------------------------

ESCAPING_STORES = ["../elsewhere", "/etc", "a/../../b", "a/..", "..", "~root", "a\\..\\..",
                   "C:\\windows", "a//b", "a/./b", "x\x00y"]
ESCAPING_LOCATORS = ["../etc/passwd", "/etc/passwd", "a/../../b", "a\\..\\..\\etc\\passwd",
                     "~root/.ssh/id_rsa", "C:\\windows\\win.ini", "a//b", "a\x00b",
                     "shard.safetensors#../../etc/passwd", "shard.safetensors#-1",
                     "shard.safetensors", "file:///etc/passwd"]


def test_store_names_and_locators_that_leave_the_store_are_refused(server: Server) -> None:
    api = server.api
    for store in ESCAPING_STORES:
        response = api.post("/v1/datasets", json={"name": "escape", "store": store},
                            headers=server.operator)
        problem(response, 422)
    assert api.post("/v1/datasets", json={"name": "escape"},
                    headers=server.operator).status_code == 201
    for locator in ESCAPING_LOCATORS:
        row = {"sample_key": "k", "label": 1, "split": "train", "locator": locator}
        as_jsonl = api.post("/v1/datasets/escape/samples", content=jsonl([row]),
                            headers={**server.operator, **NDJSON})
        assert problem(as_jsonl, 422)["line"] == 1, locator
        quoted = locator.replace('"', '""')
        as_csv = api.post("/v1/datasets/escape/samples",
                          content=f'sample_key,label,split,locator\nk,1,train,"{quoted}"\n',
                          headers={**server.operator, "Content-Type": "text/csv"})
        assert problem(as_csv, 422)["line"] == 2, locator
    counts = api.get("/v1/datasets/escape", headers=server.operator).json()["samples"]
    assert counts == {"train": 0, "holdout": 0, "test": 0, "forgotten": 0}


# ---- numbers past their column, times without a zone, forged cursors, kinds not allowed ---


def forged_cursor(*parts: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(parts).encode()).decode().rstrip("=")


VERSIONS = f"/v1/models/{SMALL_MODEL}/versions"
ALIAS = f"/v1/models/{SMALL_MODEL}/aliases/production"
REQUESTS = "/v1/deletion-requests"
# (role, method, path, JSON body, status): each was a 500 on one database or both.
OUT_OF_BOUNDS: list[tuple[str, str, str, dict[str, Any] | None, int]] = [
    ("requester", "GET", f"{VERSIONS}/{2**63}", None, 422),
    ("requester", "GET", f"{VERSIONS}/{2**31}", None, 422),  # an Integer column
    ("operator", "GET", f"{VERSIONS}/{2**64}/weights", None, 422),
    ("auditor", "GET", f"/v1/audit?after={2**63}", None, 422),
    ("operator", "PUT", ALIAS, {"version": 2**63}, 422),
    ("operator", "PUT", ALIAS, {"version": 2**31}, 422),
    ("requester", "GET", f"{REQUESTS}?received_after=2030-01-01", None, 200),  # read as UTC
    ("requester", "GET", f"{REQUESTS}?received_before=2030-01-01T00:00:00", None, 200),
    ("requester", "GET", f"{REQUESTS}?received_after=0001-01-01T00:00:00%2B01:00", None, 422),
    ("requester", "GET", f"{REQUESTS}?cursor={forged_cursor('2030-01-01T00:00', 'x')}", None,
     400),
    ("requester", "POST", REQUESTS, {"kind": "class", "class_label": 1, "model": SMALL_MODEL},
     403),
    ("requester", "POST", REQUESTS, {"kind": "backdoor", "sample_keys": ["s-00001"]}, 403),
]


def test_numbers_times_cursors_and_kinds_out_of_bounds_are_4xx_problems(server: Server
                                                                       ) -> None:
    for role, method, path, body, status in OUT_OF_BOUNDS:
        response = server.api.request(method, path, json=body, headers=server.headers[role])
        if status < 400:
            assert response.status_code == status, (path, response.text[:300])
        else:
            problem(response, status)


# ---- NaN and infinity in predict ----------------------------------------------------------


def b64(values: np.ndarray) -> str:
    return base64.b64encode(values.astype("<f4").tobytes()).decode()


def test_nan_and_infinity_in_predict_are_422_however_they_are_sent(
        server: Server, tmp_path: Path) -> None:
    api, requester = server.api, server.headers["requester"]
    predict = f"/v1/models/{SMALL_MODEL}/predict"
    state = {k: v.contiguous() for k, v in build_model(MLP).state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    uploaded = api.post(f"/v1/models/{SMALL_MODEL}/versions",
                        content=(tmp_path / "w.safetensors").read_bytes(),
                        headers={**server.operator, **OCTET})
    assert uploaded.status_code == 201, uploaded.text
    number = uploaded.json()["number"]
    assert api.put(f"/v1/models/{SMALL_MODEL}/aliases/production", json={"version": number},
                   headers=server.operator).status_code == 200
    image = np.full((1, 1, 8, 8), 0.5, dtype=np.float32)
    batch = np.repeat(image, 32, axis=0)  # 32 x 64 floats: inside the 64 KiB JSON limit

    def poisoned(value: float, where: tuple[int, ...] = (0, 0, 0, 0)) -> np.ndarray:
        copy = batch.copy()
        copy[where] = value
        return copy

    row = "[" + ",".join(["0.5"] * 8) + "]"
    clean = "[" + ",".join([row] * 8) + "]"
    bodies: dict[str, bytes] = {
        f"b64 {name}": json.dumps({"inputs_b64": b64(poisoned(value, (31, 0, 7, 7))),
                                   "shape": [32, 1, 8, 8]}).encode()
        for name, value in (("NaN", np.nan), ("+inf", np.inf), ("-inf", -np.inf))}
    for literal in ("NaN", "Infinity", "-Infinity", "1e999", "-1e999"):
        one = "[" + ",".join([row] * 7 + ["[" + ",".join(["0.5"] * 7 + [literal]) + "]"]) + "]"
        bodies[f"JSON {literal}"] = f'{{"inputs": [{clean}, {one}]}}'.encode()
    bodies["b64 signalling NaN bits"] = json.dumps({
        "inputs_b64": base64.b64encode(struct.pack("<I", 0x7FA00000) * 64).decode(),
        "shape": [1, 1, 8, 8]}).encode()
    for name, body in bodies.items():
        response = api.post(predict, content=body,
                            headers={**requester, "Content-Type": "application/json"})
        assert "NaN or infinity" in problem(response, 422)["detail"], name
    # Shapes built to overflow or allocate: refused before anything is allocated.
    for shape in ([1 << 62, 1 << 62, 1, 1], [0, 1, 8, 8], [-1, 1, 8, 8], [1, 1, 8, -8]):
        response = api.post(predict, json={"inputs_b64": b64(image), "shape": shape},
                            headers=requester)
        problem(response, 422)
    deep = b'{"inputs": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"  # under the body limit
    response = api.post(predict, content=deep,
                        headers={**requester, "Content-Type": "application/json"})
    assert response.status_code in (400, 422), response.text[:300]
    assert response.headers["content-type"] == "application/problem+json"
    # After all of it, the model still answers.
    answer = api.post(predict, json={"inputs_b64": b64(batch), "shape": [32, 1, 8, 8]},
                      headers=requester)
    assert answer.status_code == 200 and answer.json()["model_version"] == number
