"""API keys: a role, the client they act for, and only a hash of the secret."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base, UTCDateTime, utcnow


class Role(StrEnum):
    requester = "requester"
    operator = "operator"
    auditor = "auditor"
    admin = "admin"


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(24), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    role: Mapped[str] = mapped_column(String(16))
    client_id: Mapped[str] = mapped_column(String(128), index=True)
    # sha256 of the secret part: keys carry 256 random bits, so a fast hash is enough and
    # authentication stays cheap on the intake hot path.
    secret_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


CLIENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
# The one definition of a client id: the API's model, the CLI and keys.create all check it
# here. It also keeps ids from starting like a spreadsheet formula (= + - @).
ClientId = Annotated[str, Field(pattern=CLIENT_ID_PATTERN, examples=["acme-bank"],
                                description="A letter or digit, then up to 127 letters, "
                                "digits and `. _ : -`.")]
_client_id = TypeAdapter(ClientId)


def check_client_id(value: str) -> str:
    """``value`` if it is a valid client id; ValueError saying what one looks like if not."""
    try:
        return _client_id.validate_python(value)
    except ValidationError:
        raise ValueError(f"Invalid client id {value!r}: a letter or digit, then up to 127 "
                         "letters, digits and . _ : -") from None


class ApiKeyCreate(BaseModel):
    role: Role
    client_id: ClientId
    name: str = Field(default="", max_length=128, examples=["intake service"])


class ApiKeyRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    role: Role
    client_id: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyRead):
    key: str = Field(description="The full key. Shown once; only its hash is stored.")
