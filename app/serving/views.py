"""The predict route: the served model answers, naming the version that did."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.api.deps import Reader, SessionDep
from app.core.errors import PROBLEM
from app.models_registry import service as registry
from app.serving.models import PredictRequest, PredictResponse

router = APIRouter(prefix="/v1/models", tags=["serving"])


@router.post("/{name}/predict", response_model=PredictResponse,
             summary="Predict with the production version",
             responses={404: PROBLEM, 409: PROBLEM, 422: PROBLEM})
def predict(name: str, body: PredictRequest, request: Request, db_session: SessionDep,
            principal: Reader) -> PredictResponse:
    """A publish is served from the next call on, without a restart; `model_version` says
    which version answered."""
    model = registry.get(db_session, name=name)
    server = request.app.state.model_server
    response: PredictResponse = server.predict(db_session, model, body)
    return response
