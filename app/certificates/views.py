"""Routes for certificates of erasure and the key that verifies them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from app.api.deps import Reader, SessionDep
from app.certificates import service, signing
from app.core.errors import PROBLEM
from app.requests import service as requests

router = APIRouter(tags=["certificates"])


class PublicKey(BaseModel):
    key_id: str
    algorithm: str = signing.ALGORITHM
    pem: str = Field(description="SubjectPublicKeyInfo PEM.")
    jwk: dict[str, str] = Field(description="RFC 8037 OKP JWK.")


class CertificateDocument(BaseModel):
    certificate: dict[str, Any] = Field(description="The signed statement.")
    signature: str = Field(description="Base64 Ed25519 signature over the statement's "
                                       "canonical JSON (sorted keys, no whitespace, UTF-8).")
    algorithm: str
    key_id: str


@router.get("/v1/certificates/public-key", response_model=PublicKey,
            summary="The public key certificates are signed with (no authentication)")
def public_key(request: Request) -> PublicKey:
    key = request.app.state.signer.private_key.public_key()
    return PublicKey(key_id=signing.key_id(key), pem=signing.public_pem(key),
                     jwk=signing.public_jwk(key))


@router.get("/v1/deletion-requests/{request_id}/certificate",
            response_model=CertificateDocument, summary="The signed certificate of erasure",
            responses={404: PROBLEM})
def get_certificate(request_id: str, db_session: SessionDep, principal: Reader
                    ) -> CertificateDocument:
    """Verify offline with `lethe certificate verify FILE --public-key key.pem`."""
    requests.get(db_session, request_id=request_id, principal=principal)  # visibility rules
    return CertificateDocument(**service.document_for(db_session, request_id=request_id))
