"""The Grafana dashboard and monitoring profile: every metric a panel queries is one that
/metrics really exports, and the provisioning paths match the compose mounts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.observability import metrics
from tests.dashboard.conftest import make_world

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "lethe.json"


def panel_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"]
            for target in panel.get("targets", [])]


def test_every_metric_the_dashboard_queries_is_exported(sqlite_url: str, tmp_path: Path
                                                         ) -> None:
    world = make_world(sqlite_url, tmp_path / "data")
    metrics.observe_predict("fashion-cnn", 0.01, samples=4)
    with TestClient(world.app) as client:
        client.get("/healthz")
        exported = {sample.name
                    for family in text_string_to_metric_families(client.get("/metrics").text)
                    for sample in family.samples}
    world.app.state.engine.dispose()
    queried = {name for expr in panel_queries() for name in re.findall(r"lethe_[a-z_]+", expr)}
    assert len(queried) >= 15
    assert queried <= exported, sorted(queried - exported)


def test_panels_use_the_provisioned_datasource_and_unique_ids() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "lethe-overview"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    datasource = yaml.safe_load((ROOT / "deploy" / "grafana" / "provisioning" / "datasources"
                                 / "prometheus.yml").read_text())["datasources"][0]
    assert dashboard["templating"]["list"][0]["current"]["value"] == datasource["uid"]
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_provisioning_and_scrape_config_match_the_compose_file() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    provider = yaml.safe_load((ROOT / "deploy" / "grafana" / "provisioning" / "dashboards"
                               / "lethe.yml").read_text())["providers"][0]
    mounts = dict(volume.split(":")[:2] for volume in compose["grafana"]["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == ["api:8000"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in compose[
        "prometheus"]["volumes"]
