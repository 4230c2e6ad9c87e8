"""Intake by group commit: requests recorded in one transaction each get the answer they would
have had alone (app/requests/intake.py, app/core/group_commit.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.audit import service as audit
from app.core.db import session_scope
from app.core.errors import Conflict, Forbidden, Problem, Unauthorized, Unprocessable
from app.core.group_commit import GroupCommit
from app.requests.intake import Presented, Submitted, record_batch
from app.requests.models import DeletionRequest, DeletionTarget, SamplesRequest, SubjectRequest
from tests.api.conftest import KeyFactory
from tests.api.seed import seed_model
from tests.conftest import app_of


def key_of(headers: dict[str, str]) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


def subject(ref: str, model: str | None = None) -> SubjectRequest:
    return SubjectRequest(kind="subject", subject_ref=ref, model=model)


def recorded(answer: Submitted | Problem) -> Submitted:
    """The request an item recorded (or replayed) and whether it was a replay."""
    assert not isinstance(answer, Problem), answer
    return answer


def test_one_batch_answers_each_request_as_if_it_came_alone(
        client: TestClient, make_key: KeyFactory, operator: dict[str, str],
        database_url: str) -> None:
    seed_model(client, operator)
    acme, other = key_of(make_key("requester", "acme")), key_of(make_key("requester", "other"))
    auditor = key_of(make_key("auditor", "compliance"))
    app = app_of(client)
    # customer-0 was recorded earlier under the key "earlier".
    (earlier,) = record_batch(app.state.sessionmaker, app.state.secret_key,
                              [Presented(acme, subject("customer-0"), "earlier", None)])
    assert not isinstance(earlier, Problem)
    items = [
        Presented(acme, subject("customer-1"), "k1", "trace-1"),          # 0 recorded
        Presented("lethe_nope_nope", subject("customer-2"), None, None),  # 1 unknown key
        Presented(auditor, subject("customer-2"), None, None),            # 2 role may not
        Presented(acme, subject("customer-2", model="missing"), None, None),  # 3 no model
        Presented(acme, subject("customer-1"), "k1", None),               # 4 repeat: replay
        Presented(acme, subject("customer-3"), "k1", None),               # 5 other body: 409
        Presented(other, subject("customer-1"), "k1", None),              # 6 other client
        Presented(acme, subject("customer-0"), "earlier", None),          # 7 replay of earlier
        Presented(acme, subject("nobody"), None, None),                   # 8 no_data
        Presented(acme, SamplesRequest(kind="samples", sample_keys=["s-00016", "zz"]),
                  None, None),                                            # 9 samples kind
    ]
    answers = record_batch(app.state.sessionmaker, app.state.secret_key, items)
    assert len(answers) == len(items)
    assert isinstance(answers[1], Unauthorized)
    assert isinstance(answers[2], Forbidden)
    assert isinstance(answers[3], Unprocessable)
    assert isinstance(answers[5], Conflict)
    (first, replayed), (repeat, repeat_replayed) = recorded(answers[0]), recorded(answers[4])
    assert not replayed and repeat_replayed and repeat.id == first.id
    assert first.status == "queued" and first.targets[0].sample_count == 4
    other_client, _ = recorded(answers[6])
    assert other_client.id != first.id and other_client.client_id == "other"
    again, again_replayed = recorded(answers[7])
    assert again_replayed and again.id == earlier[0].id
    nothing, _ = recorded(answers[8])
    assert nothing.status == "rejected" and nothing.outcome == "no_data"
    samples, _ = recorded(answers[9])
    assert samples.payload["missing_sample_keys"] == ["zz"]

    with session_scope(app.state.sessionmaker) as db_session:
        stored = db_session.scalars(select(DeletionRequest).order_by(
            DeletionRequest.received_at)).all()
        assert len(stored) == 5  # earlier, customer-1 twice (two clients), nobody, samples
        stored_first = db_session.get(DeletionRequest, first.id)
        assert stored_first is not None and stored_first.trace_id == "trace-1"
        assert db_session.scalar(select(func.count()).select_from(DeletionTarget)) == 4
        assert audit.verify_chain(db_session).ok


def test_a_value_the_database_cannot_store_fails_only_its_own_request(
        client: TestClient, requester: dict[str, str], operator: dict[str, str],
        database_url: str) -> None:
    """On PostgreSQL a NUL aborts the batch's transaction; the batch is written again one by
    one, so the others are still recorded."""
    seed_model(client, operator)
    app, key = app_of(client), key_of(requester)
    answers = record_batch(app.state.sessionmaker, app.state.secret_key, [
        Presented(key, subject("customer-1"), "a", None),
        Presented(key, SamplesRequest(kind="samples", sample_keys=["bad\x00"]), "b", None),
        Presented(key, subject("customer-2"), "c", None),
    ])
    assert not isinstance(answers[0], Problem) and not isinstance(answers[2], Problem)
    if database_url.startswith("postgresql"):
        assert isinstance(answers[1], Unprocessable) and answers[1].status == 422
    with session_scope(app.state.sessionmaker) as db_session:
        keys = set(db_session.scalars(select(DeletionRequest.idempotency_key)))
        assert {"a", "c"} <= keys
        assert audit.verify_chain(db_session).ok


def test_concurrent_posts_share_transactions_and_every_answer_is_recorded(
        client: TestClient, requester: dict[str, str], operator: dict[str, str]) -> None:
    seed_model(client, operator)
    intake: GroupCommit = app_of(client).state.intake
    before = (intake.batches, intake.items)
    with ThreadPoolExecutor(max_workers=24) as pool:
        responses = list(pool.map(lambda i: client.post(
            "/v1/deletion-requests", json={"kind": "subject", "subject_ref": f"customer-{i % 5}"},
            headers={**requester, "Idempotency-Key": f"burst-{i}"}), range(96)))
    assert {r.status_code for r in responses} == {202}
    batches, items = intake.batches - before[0], intake.items - before[1]
    assert items == 96 and batches < items  # some requests were written together
    ids = {r.json()["id"] for r in responses}
    with session_scope(app_of(client).state.sessionmaker) as db_session:
        stored = set(db_session.scalars(select(DeletionRequest.id)))
    assert len(ids) == 96 and ids <= stored


def test_the_group_committer_batches_what_queues_meanwhile_and_isolates_failures() -> None:
    calls: list[list[int]] = []
    gate = threading.Event()

    def run_batch(items: list[int]) -> list[int | Exception]:
        calls.append(items)
        if len(calls) == 1:
            gate.wait(5)  # the first batch is slow: the rest queue up behind it
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]

    async def scenario() -> list[int | BaseException]:
        committer: GroupCommit[int, int] = GroupCommit(run_batch, max_batch=4)
        first = asyncio.create_task(committer.submit(0))
        await asyncio.sleep(0.05)
        rest = [asyncio.create_task(committer.submit(i)) for i in range(1, 7)]
        await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.gather(first, *rest, return_exceptions=True)

    results = asyncio.run(scenario())
    assert calls == [[0], [1, 2, 3, 4], [5, 6]]
    assert [r if isinstance(r, int) else str(r) for r in results] == [
        0, "odd 1", 20, "odd 3", 40, "odd 5", 60]


def test_a_batch_that_raises_fails_every_caller_of_that_batch_only() -> None:
    def run_batch(items: list[int]) -> list[int]:
        if 13 in items:
            raise RuntimeError("database down")
        time.sleep(0.01)
        return items

    async def scenario() -> list[int | BaseException]:
        committer: GroupCommit[int, int] = GroupCommit(run_batch, max_batch=1)
        return await asyncio.gather(*(committer.submit(i) for i in (12, 13, 14)),
                                    return_exceptions=True)

    results = asyncio.run(scenario())
    assert results[0] == 12 and results[2] == 14
    assert isinstance(results[1], RuntimeError)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Basic abc"},
                                     {"Authorization": "Bearer lethe_x_y"}])
def test_the_batched_route_still_refuses_missing_and_bad_keys_with_401(
        client: TestClient, headers: dict[str, str]) -> None:
    response = client.post("/v1/deletion-requests", json={"kind": "subject", "subject_ref": "a"},
                           headers=headers)
    assert response.status_code == 401
    assert response.headers["content-type"].startswith("application/problem+json")
