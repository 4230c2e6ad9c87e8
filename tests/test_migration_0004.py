"""Revision 0004 turns the stored scenario strings into the engine's JSON: rows written by
revision 0003 come out as Scenario.to_dict(), a backdoor with its own request's trigger and
poisoned label, and the downgrade gives the strings back."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from app.core import migrate
from app.core.db import make_engine
from unlearning.scenarios import Scenario

TRIGGER = {"size": 3, "value": 255, "corner": "top-left", "margin": 1}


def _filler(column: sa.Column[Any]) -> Any:
    """A value for a required column this test does not care about."""
    kind = column.type
    if isinstance(kind, sa.JSON) or "JSON" in type(kind).__name__.upper():
        return "{}"
    if isinstance(kind, sa.DateTime | sa.TIMESTAMP) or "DATETIME" in str(kind).upper() \
            or "TIMESTAMP" in str(kind).upper():
        return datetime(2026, 1, 1, tzinfo=UTC)
    if isinstance(kind, sa.Integer | sa.Float | sa.Numeric):
        return 0
    if isinstance(kind, sa.Boolean):
        return False
    return "x"


def _insert(connection: sa.Connection, table: sa.Table, **values: Any) -> None:
    row = {c.name: _filler(c) for c in table.columns
           if not c.nullable and c.name not in values and c.autoincrement is not True}
    connection.execute(table.insert().values(**{**row, **values}))


def test_scenarios_become_the_engines_json_and_back(database_url: str) -> None:
    migrate.downgrade(database_url, "0003")
    engine = make_engine(database_url)
    tables = sa.MetaData()
    tables.reflect(engine)
    t = tables.tables
    with engine.begin() as connection:
        _insert(connection, t["datasets"], id=1, name="d", store="d")
        _insert(connection, t["models"], id=1, name="m", dataset_id=1)
        for n, (key, label) in enumerate([("p1", 7), ("p2", 7), ("p3", 2)], start=1):
            _insert(connection, t["samples"], id=n, dataset_id=1, sample_key=key,
                    label=label, split="train", locator=f"s.safetensors#{n}")
        for rid, payload in (("r-subset", {}), ("r-class", {"class_label": 3}),
                             ("r-back", {"sample_keys": ["p1", "p2", "p3"],
                                         "trigger": TRIGGER}),
                             ("r-text", {"sample_keys": ["p3"], "trigger": "a yellow square"})):
            _insert(connection, t["deletion_requests"], id=rid, payload=payload)
        _insert(connection, t["unlearning_jobs"], id="job-back", model_id=1,
                scenario="backdoor")
        _insert(connection, t["unlearning_jobs"], id="job-class", model_id=1,
                scenario="class:3")
        for n, (rid, scenario, job) in enumerate([
                ("r-subset", "subset", None), ("r-class", "class:3", "job-class"),
                ("r-back", "backdoor", "job-back"), ("r-text", "backdoor", None)], start=1):
            _insert(connection, t["deletion_targets"], id=n, request_id=rid, model_id=1,
                    scenario=scenario, job_id=job)
    engine.dispose()

    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    with engine.connect() as connection:
        targets = {rid: Scenario.from_dict(_json(value)) for rid, value in connection.execute(
            sa.text("SELECT request_id, scenario FROM deletion_targets"))}
        jobs = {jid: Scenario.from_dict(_json(value)) for jid, value in connection.execute(
            sa.text("SELECT id, scenario FROM unlearning_jobs"))}
    engine.dispose()
    assert targets["r-subset"] == Scenario("subset")
    assert targets["r-class"] == Scenario("class", forget_class=3)
    backdoor = targets["r-back"]
    assert (backdoor.kind, backdoor.target_label) == ("backdoor", 7)  # two of three are 7
    assert backdoor.trigger is not None and backdoor.trigger.to_dict() == TRIGGER
    assert targets["r-text"].trigger is None and targets["r-text"].target_label == 2
    assert jobs == {"job-back": backdoor, "job-class": Scenario("class", forget_class=3)}

    migrate.downgrade(database_url, "0003")
    engine = make_engine(database_url)
    with engine.connect() as connection:
        texts: dict[str, str] = {rid: text for rid, text in connection.execute(sa.text(
            "SELECT request_id, scenario FROM deletion_targets"))}
    engine.dispose()
    assert texts == {"r-subset": "subset", "r-class": "class:3", "r-back": "backdoor",
                     "r-text": "backdoor"}
    migrate.upgrade(database_url)


def _json(value: Any) -> dict[str, Any]:
    loaded = json.loads(value) if isinstance(value, str) else value
    assert isinstance(loaded, dict)
    return loaded
