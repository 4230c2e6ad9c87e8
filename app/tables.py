"""Imports every domain's tables so ``Base.metadata`` is complete (Alembic, tests, workers)."""

from app.audit.models import AuditEvent
from app.auth.models import ApiKey
from app.certificates.models import Certificate
from app.core.db import Base
from app.dashboard.models import DashboardSignIn, FailedSignIn
from app.datasets.models import Dataset, Sample
from app.jobs.models import UnlearningJob
from app.models_registry.models import Model, ModelAlias, ModelVersion
from app.references.models import ReferenceSet, ReferenceStatistic
from app.requests.models import DeletionRequest, DeletionTarget
from app.webhooks.models import Webhook, WebhookDelivery

metadata = Base.metadata

__all__ = ["ApiKey", "AuditEvent", "Certificate", "DashboardSignIn", "Dataset",
           "DeletionRequest", "DeletionTarget", "FailedSignIn", "Model", "ModelAlias",
           "ModelVersion", "ReferenceSet", "ReferenceStatistic", "Sample", "UnlearningJob",
           "Webhook", "WebhookDelivery", "metadata"]
