"""Bad input gets a 4xx problem body (RFC 9457), never a 500."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from httpx import Response

from app.core.config import Settings
from app.main import create_app
from tests.api.conftest import KeyFactory
from tests.api.seed import seed_model


def assert_problem(response: Response, status: int) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status
    assert {"type", "title", "detail"} <= body.keys()


@pytest.mark.parametrize("body", [
    b"{not json", b"[]", b'{"kind": "subject"}', b'{"kind": "nope"}',
    b'{"kind": "subject", "subject_ref": ""}', b'{"kind": "class", "class_label": -1, '
    b'"model": "m"}', b'{"kind": "samples", "sample_keys": []}',
    b'{"kind": "subject", "subject_ref": "x", "unexpected": 1}',
])
def test_invalid_request_bodies_are_422(client: TestClient, requester: dict[str, str],
                                        body: bytes) -> None:
    response = client.post("/v1/deletion-requests", content=body,
                           headers={**requester, "Content-Type": "application/json"})
    assert_problem(response, 422)


def test_validation_problems_list_the_failing_fields(client: TestClient,
                                                     requester: dict[str, str]) -> None:
    response = client.post("/v1/deletion-requests", json={"kind": "subject"},
                           headers=requester)
    assert any(e["loc"][-1] == "subject_ref" for e in response.json()["errors"])


def test_unknown_routes_and_methods_are_problems(client: TestClient) -> None:
    assert_problem(client.get("/v1/nothing-here"), 404)
    assert_problem(client.delete("/healthz"), 405)


def test_oversized_bodies_are_413(database_url: str, tmp_path: Path,
                                  make_key: KeyFactory) -> None:
    app = create_app(Settings(data_dir=tmp_path, database_url=database_url,
                              secret_key="s", max_body_bytes=1000))
    with TestClient(app) as small:
        big = {"kind": "samples", "sample_keys": ["k" * 200] * 20}
        response = small.post("/v1/deletion-requests", json=big,
                              headers=make_key("requester"))
        assert_problem(response, 413)

        def chunks() -> Iterator[bytes]:
            yield b'{"kind": "samples", "sample_keys": ['
            for _ in range(100):
                yield b'"' + b"k" * 100 + b'",'
            yield b'"x"]}'

        # No Content-Length: the limit is enforced on the bytes that arrive.
        streamed = small.post("/v1/deletion-requests", content=chunks(),
                              headers={**make_key("requester"),
                                       "Content-Type": "application/json"})
        assert_problem(streamed, 413)
    app.state.engine.dispose()


def test_values_postgresql_cannot_store_are_422_problems_not_500(
        client: TestClient, requester: dict[str, str], operator: dict[str, str],
        database_url: str) -> None:
    # PostgreSQL keeps no NUL character in text or JSON; found by the reliability fuzzing.
    answers = [
        client.post("/v1/deletion-requests", json={"kind": "samples", "sample_keys": ["a\x00"]},
                    headers=requester),
        client.post("/v1/deletion-requests",
                    json={"kind": "subject", "subject_ref": "x", "model": "m\x00"},
                    headers=requester),
        client.get("/v1/datasets/a%00b", headers=operator),
        client.get("/v1/deletion-requests", params={"client": "\x00"}, headers=operator),
        client.post("/v1/datasets", json={"name": "d", "description": "\x00"},
                    headers=operator),
    ]
    if database_url.startswith("postgresql"):
        for response in answers:
            assert_problem(response, 422)
            assert response.json()["type"] == "urn:lethe:problem:unstorable-value"
    else:  # SQLite stores NUL like any other character
        assert [r.status_code for r in answers] == [202, 422, 404, 200, 201]


def test_the_openapi_document_says_every_error_is_a_problem_body(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            errors = {status: r for status, r in responses.items() if status >= "400"}
            assert all(r["content"] == problem for r in errors.values()), (method, path)
            if operation.get("security"):
                assert {"401", "403", "503"} <= errors.keys(), (method, path)
            if "requestBody" in operation:
                assert {"400", "413", "422"} <= errors.keys(), (method, path)


def test_bad_query_parameters_are_422(client: TestClient, requester: dict[str, str]) -> None:
    assert_problem(client.get("/v1/deletion-requests", params={"limit": 0},
                              headers=requester), 422)
    assert_problem(client.get("/v1/deletion-requests", params={"status": "bogus"},
                              headers=requester), 422)
    assert_problem(client.get("/v1/deletion-requests",
                              params={"received_after": "yesterday"}, headers=requester), 422)


def test_numbers_past_their_columns_range_are_422_naming_the_parameter(
        client: TestClient, operator: dict[str, str], auditor: dict[str, str]) -> None:
    # SQLite's driver raised OverflowError (a 500) past 2^63; PostgreSQL refused past the
    # column's range. Both are now stopped at the door, on either database.
    seed_model(client, operator, model="m")
    past_64, past_32 = 2**63, 2**31
    answers = {
        ("path", "number"): [client.get(f"/v1/models/m/versions/{past_64}", headers=operator),
                             client.get(f"/v1/models/m/versions/{past_32}", headers=operator),
                             client.get(f"/v1/models/m/versions/{past_64}/weights",
                                        headers=operator),
                             client.get("/v1/models/m/versions/0", headers=operator)],
        ("query", "after"): [client.get("/v1/audit", params={"after": past_64},
                                        headers=auditor)],
        ("body", "version"): [client.put("/v1/models/m/aliases/production",
                                         json={"version": number}, headers=operator)
                              for number in (past_64, past_32, 0)],
    }
    for loc, responses in answers.items():
        for response in responses:
            assert_problem(response, 422)
            assert response.json()["errors"][0]["loc"] == list(loc), response.text
    assert client.get("/v1/audit", params={"after": 2**63 - 1}, headers=auditor
                      ).json()["items"] == []
    assert_problem(client.get(f"/v1/models/m/versions/{past_32 - 1}", headers=operator), 404)


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["database"] == "ok"


def test_openapi_documents_the_api_with_examples(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    create = spec["paths"]["/v1/deletion-requests"]["post"]
    examples = create["requestBody"]["content"]["application/json"]["examples"]
    assert set(examples) == {"subject", "samples", "class", "backdoor"}
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_concurrent_first_readiness_probes_all_reach_the_broker() -> None:
    """A fresh process, 16 threads pinging a memory broker at once: kombu resolves its
    attributes lazily, and threads racing through that first got ImportError, which readyz
    reported as a 503 on a healthy service. So app.health resolves kombu's Connection when it
    is imported (checked directly: the race itself shows only now and then)."""
    script = (
        "import sys, threading\n"
        "from app.health import ping_broker\n"
        "print('kombu.connection' in sys.modules)\n"
        "barrier, errors = threading.Barrier(16), []\n"
        "def ping():\n"
        "    barrier.wait()\n"
        "    try:\n"
        "        ping_broker('memory://')\n"
        "    except Exception as error:\n"
        "        errors.append(repr(error))\n"
        "threads = [threading.Thread(target=ping) for _ in range(16)]\n"
        "[t.start() for t in threads]\n"
        "[t.join() for t in threads]\n"
        "print(errors)\n")
    for _ in range(4):
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[2], timeout=60, check=True)
        assert run.stdout.split("\n")[:2] == ["True", "[]"], run.stdout
