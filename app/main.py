"""The FastAPI application: wiring only. Domains live in their own folders."""

from __future__ import annotations

import logging

from fastapi import FastAPI

from app.audit.views import router as audit_router
from app.auth.views import router as keys_router
from app.certificates.service import Signer
from app.certificates.views import router as certificates_router
from app.core.admission import AdmissionMiddleware
from app.core.config import Settings, get_settings
from app.core.db import make_engine, make_sessionmaker, pool_capacity
from app.core.errors import install_problem_handlers
from app.core.limits import BodyLimitMiddleware
from app.dashboard.views import install as install_dashboard
from app.datasets.views import router as datasets_router
from app.health import router as health_router
from app.jobs.views import router as jobs_router
from app.models_registry.artifacts import ArtifactStore
from app.models_registry.views import router as models_router
from app.observability.metrics import router as metrics_router
from app.observability.middleware import ObservabilityMiddleware
from app.references.views import router as references_router
from app.requests.intake import group_committer
from app.requests.views import router as requests_router
from app.serving.service import ModelServer
from app.serving.views import router as serving_router
from app.webhooks.views import router as webhooks_router

DESCRIPTION = """
Lethe records right-to-be-forgotten (GDPR Art. 17) requests against deployed models, unlearns
the data they cover, verifies with a membership-inference attack that the model no longer
tells the data from data it never saw, publishes the verified model and signs a certificate.

Authenticate with `Authorization: Bearer <API key>`. Errors are RFC 9457 problem bodies
(`application/problem+json`).
"""

# anyio's default threadpool size, which runs sync routes and dependencies.
THREADPOOL_TOKENS = 40
UPLOAD_PATHS = [r"/v1/models/[^/]+/versions", r"/v1/datasets/[^/]+/samples",
                r"/v1/datasets/[^/]+/shards/.+"]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(title="Lethe", version="0.1.0", description=DESCRIPTION)
    engine = make_engine(settings.resolved_database_url, pool_size=settings.db_pool_size,
                         max_overflow=settings.db_max_overflow)
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = make_sessionmaker(engine)
    app.state.secret_key = settings.resolved_secret_key()
    app.state.artifact_store = ArtifactStore(settings.resolved_artifact_dir)
    app.state.signer = Signer.from_settings(settings)
    app.state.model_server = ModelServer(app.state.artifact_store,
                                         settings.resolved_dataset_dir)
    app.state.intake = group_committer(app.state.sessionmaker, app.state.secret_key)

    install_problem_handlers(app)
    # A request waits for admission before it holds a thread or a connection (admission.py).
    app.add_middleware(AdmissionMiddleware, limit=min(pool_capacity(engine), THREADPOOL_TOKENS),
                       exempt=frozenset({"/healthz"}),
                       exempt_routes=frozenset({("POST", "/v1/deletion-requests")}))
    app.add_middleware(BodyLimitMiddleware, default_limit=settings.max_body_bytes,
                       upload_limit=settings.max_upload_bytes, upload_paths=UPLOAD_PATHS)
    # Outermost, so even a request refused by admission or the body limit gets an id and a
    # log line.
    app.add_middleware(ObservabilityMiddleware, access_log_enabled=settings.access_log)
    for router in (health_router, requests_router, datasets_router, models_router,
                   serving_router, jobs_router, certificates_router, audit_router, keys_router,
                   webhooks_router, references_router):
        app.include_router(router)
    app.include_router(metrics_router)
    install_dashboard(app)
    logging.getLogger(__name__).info("Lethe API on %s", engine.url.render_as_string())
    return app
