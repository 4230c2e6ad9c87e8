"""Value types for what the API and the dashboard read from paths, queries, forms and bodies.
Each says in one place which values it takes; anything else is a 422 at the door, before a
driver or the database sees it (SQLite's driver raises OverflowError on an integer past 64
bits, PostgreSQL a DataError past a column's range, and a naive datetime cannot be compared
with the stored UTC ones)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from annotated_types import Interval
from pydantic import AfterValidator, TypeAdapter

INT32_MAX = 2**31 - 1  # an Integer column on PostgreSQL
INT64_MAX = 2**63 - 1  # a BigInteger column, and any SQLite integer

# Bounds as annotated-types constraints rather than pydantic's Field: FastAPI takes a Field in
# an Annotated parameter for the parameter's own declaration, and a model field's Field(...)
# would replace them.
VersionNumber = Annotated[int, Interval(ge=1, le=INT32_MAX)]  # model_versions.number
AuditSeq = Annotated[int, Interval(ge=0, le=INT64_MAX)]  # audit_events.seq (0: before the first)

NAIVE_IS_UTC = ("A date, or a date and time without a zone, is read as UTC "
                "(`2030-01-01` is midnight UTC); one with a zone is converted to UTC.")


def in_utc(value: datetime) -> datetime:
    """The rule for every datetime the API is given: without a zone it is UTC."""
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+01:00 is before the first UTC datetime
        raise ValueError("the time has no UTC equivalent") from None


UTCDatetime = Annotated[datetime, AfterValidator(in_utc)]
parse_utc_datetime = TypeAdapter(UTCDatetime).validate_python
