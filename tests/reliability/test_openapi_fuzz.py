"""schemathesis against /openapi.json: every operation, valid and invalid input, with an admin
key and again with a requester's, on a seeded world on PostgreSQL (requests in every state,
published, superseded and rejected versions with real weights, jobs, certificates, webhooks).
No answer may be a server error or break the documented schema: undocumented status codes
and content types count as breaking it.

Bounded: EXAMPLES_PER_OPERATION cases per operation and role, derandomized, so a run costs
the same and finds the same things each time (raise it locally to search harder)."""

from __future__ import annotations

import os
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import hypothesis.strategies as st
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from safetensors.torch import save_file
from schemathesis import GenerationMode, checks
from schemathesis.core.result import Ok
from sqlalchemy import create_engine, select, text

from app.auth import service as keys
from app.auth.models import Role
from app.auth.service import Principal
from app.core.config import Settings
from app.core.db import session_scope
from app.main import create_app
from app.models_registry.models import Model, ModelVersion
from app.webhooks import service as webhooks
from tests.conftest import POSTGRES_ADMIN_URL, _database_url
from tests.dashboard.seed import seed
from unlearning.architectures import build_model

pytestmark = [pytest.mark.reliability, pytest.mark.postgres]

EXAMPLES_PER_OPERATION = int(os.environ.get("LETHE_FUZZ_EXAMPLES", "30"))
# What the answers must satisfy. Left out: `positive_data_acceptance` (a schema-valid body may
# still name a dataset that does not exist: 422 is right), and `ignored_auth` and
# `negative_data_rejection`, which judge a case by the Authorization header it was generated
# with, while every case here is sent with a real key (tests/api/test_auth.py covers refusals).
CHECKS = [checks.not_a_server_error, checks.status_code_conformance,
          checks.content_type_conformance, checks.response_schema_conformance,
          checks.response_headers_conformance]


@dataclass
class Fuzzed:
    app: FastAPI
    keys: dict[str, str]  # role -> plain key
    known: dict[str, list[Any]]  # path parameter -> values that exist


def real_weights(app: FastAPI) -> None:
    """The dashboard's seed stores random bytes as weights; give every stored version real
    weights for its model's architecture (with their sha256), so predict can serve them."""
    store = app.state.artifact_store
    with session_scope(app.state.sessionmaker) as db_session:
        for version, model in db_session.execute(
                select(ModelVersion, Model).join(Model, Model.id == ModelVersion.model_id)):
            if version.artifact_uri is None:
                continue
            path = store.path_of(version.artifact_uri)
            state = build_model(model.architecture).state_dict()
            save_file({k: v.contiguous() for k, v in state.items()}, str(path))
            staged = store.stage_file(path)
            version.sha256, version.size_bytes = staged.sha256, staged.size_bytes


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, postgres_template: str
           ) -> Iterator[Fuzzed]:
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"lethe_fuzz_{uuid.uuid4().hex[:10]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{postgres_template}"'))
    app = create_app(Settings(data_dir=tmp_path_factory.mktemp("fuzz"),
                              database_url=_database_url(POSTGRES_ADMIN_URL, name),
                              secret_key="fuzz-secret", broker_url="memory://",
                              access_log=False))
    seeded = seed(app.state.sessionmaker, store=app.state.artifact_store,
                  signer=app.state.signer, secret_key=app.state.secret_key)
    real_weights(app)
    with session_scope(app.state.sessionmaker) as db_session:
        root, seeded.keys["admin"] = keys.create(db_session, role=Role.admin, client_id="root")
        # Ids the fuzzer may revoke or delete: never the keys it calls with.
        victim, _ = keys.create(db_session, role=Role.requester, client_id="victim")
        principal = Principal(key_id=root.id, role=Role.admin, client_id="root")
        # A public address, not a name: a target is resolved, and this machine may have no DNS.
        hooks = [webhooks.create(db_session, principal=principal, secret_key=b"fuzz-secret",
                                 url=f"https://93.184.215.14/hook/{n}")[0].id for n in range(3)]
    known: dict[str, list[Any]] = {
        "name": ["fashion-cnn", "digits-mlp", "fashion-mnist", "digits"],
        "request_id": list(seeded.requests.values()),
        "job_id": list(seeded.jobs.values()),
        "number": [1, 2, 3, 4, 5],
        "alias": ["production", "staging"],
        "key_id": [victim.id],
        "webhook_id": hooks}
    yield Fuzzed(app, seeded.keys, known)
    app.state.engine.dispose()
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def strategies(operation: Any, known: dict[str, list[Any]]) -> Any:
    """Valid and invalid cases; for operations with path parameters, half of them use names
    and ids that exist, so they reach their domain logic instead of stopping at 404."""
    modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
    names = [p.name for p in operation.path_parameters]
    options = [operation.as_strategy(generation_mode=mode) for mode in modes]
    if names and all(n in known for n in names):
        existing = st.fixed_dictionaries({n: st.sampled_from(known[n]) for n in names})

        def existing_cases(mode: GenerationMode) -> Callable[[dict[str, Any]], Any]:
            return lambda values: operation.as_strategy(generation_mode=mode,
                                                        path_parameters=values)

        options += [existing.flatmap(existing_cases(mode)) for mode in modes]
    return st.one_of(options)


def fuzz_operation(operation: Any, known: dict[str, list[Any]], headers: dict[str, str],
                   examples: int) -> Counter[int]:
    """Run the operation's cases; returns the statuses it answered (raises on a failure)."""
    answered: Counter[int] = Counter()

    @given(case=strategies(operation, known))
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def fuzz(case: Any) -> None:
        case.headers = {**(case.headers or {}), **headers}
        answered[case.call_and_validate(checks=CHECKS).status_code] += 1

    fuzz()
    return answered


@pytest.mark.parametrize(("role", "share"), [("admin", 1.0), ("requester", 0.5)])
def test_no_operation_answers_a_server_error_or_breaks_its_schema(
        fuzzed: Fuzzed, role: str, share: float) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzzed.app)
    headers = {"Authorization": f"Bearer {fuzzed.keys[role]}"}
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # an Err: an operation the schema cannot give
        operations.append(result.ok())
    assert len(operations) >= 38
    failures: dict[str, str] = {}
    answered: dict[str, Counter[int]] = {}
    for operation in operations:
        try:
            answered[operation.label] = fuzz_operation(
                operation, fuzzed.known, headers, max(5, int(EXAMPLES_PER_OPERATION * share)))
        except (Exception, BaseExceptionGroup) as failure:  # every operation's, together
            failures[operation.label] = str(failure)[:3000]
    assert not failures, "\n\n".join(f"== {label}\n{text}" for label, text in failures.items())
    if role == "admin":  # every read reached data it was seeded with, not only 404s and 422s
        unread = [label for label, counts in answered.items() if label.startswith("GET ")
                  and not any(200 <= status < 300 for status in counts)]
        assert not unread, {label: dict(answered[label]) for label in unread}
    print(f"\n{role}: " + "; ".join(f"{label} {dict(counts)}"
                                     for label, counts in answered.items()))
