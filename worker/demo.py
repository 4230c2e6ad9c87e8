"""`lethe demo`: the mission end to end on the embedded default, narrated.

Fashion-MNIST (or scikit-learn's digits, saying so, where it cannot be fetched) becomes a
sample store with pseudonymous subjects; an original model is trained on it and registered
over HTTP like an operator would; API, worker, beat and the embedded broker start; several
subjects ask to be forgotten over HTTP; the batch is unlearned, attacked by the membership
inference gate, published and served; each request gets a certificate, verified here."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import click
import httpx

from unlearning.data.catalog import iter_manifest
from unlearning.training import Recipe
from worker.world import World, api_keys, build_world, register_world, subjects_in

MODEL = "fashion-classifier"
DATASET = "fashion"
URL = "/v1/deletion-requests"


def say(message: str = "", **style: Any) -> None:
    click.secho(message, **style)


def run_demo(data_dir: Path, *, port: int, subjects: int) -> int:
    started = time.monotonic()
    data_dir = data_dir.resolve()
    world_root = data_dir.parent / "demo-world"  # kept between runs: training is the slow part
    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)
    os.environ.update({"LETHE_DATA_DIR": str(data_dir), "LETHE_DATABASE_URL": "",
                       "LETHE_BROKER_URL": "", "LETHE_BATCH_INTERVAL_SECONDS": "1",
                       "LETHE_LOG_FORMAT": "text", "LETHE_ACCESS_LOG": "false"})
    from app.core.config import get_settings

    get_settings.cache_clear()
    settings = get_settings()

    say("1/7  Data and the original model", bold=True)
    world = build_world(world_root, data_dir=data_dir.parent, n_pool=4000, n_test=2000,
                        holdout_fraction=0.3, recipe=Recipe(epochs=30, lr=0.05,
                                                            weight_decay=0.0))
    if world.dataset != "fashion-mnist":
        say("     Fashion-MNIST could not be fetched: using scikit-learn's digits instead.",
            fg="yellow")
    say(f"     {world.dataset}: cnn-small trained to train accuracy "
        f"{world.metrics['train_accuracy']:.3f}, test accuracy "
        f"{world.metrics['test_accuracy']:.3f} (the gap is what a membership attack reads)")
    store = settings.resolved_dataset_dir / world.store
    shutil.copytree(world_root / "datasets" / world.store, store)

    say("2/7  Starting API, worker, beat and the embedded broker", bold=True)
    from app.cli import ensure_schema
    from worker.cli import start_services, stop_services
    from worker.embedded_broker import EmbeddedBroker

    ensure_schema(settings.resolved_database_url)
    broker = EmbeddedBroker(settings.embedded_broker_socket)
    broker.start()
    processes = start_services("127.0.0.1", port, log_dir=str(data_dir))
    try:
        base_url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base_url, timeout=60) as api:
            _wait(lambda: _healthy(api), 120, "the API")
            say(f"     API on {base_url}/docs, logs in {data_dir}")
            outcome = _drive(api, settings, world, store, subjects, data_dir)
    finally:
        stop_services(processes)
        broker.stop()
    say(f"Done in {time.monotonic() - started:.0f} s.", bold=True)
    return outcome


def _drive(api: httpx.Client, settings: Any, world: World, store: Path, subjects: int,
           data_dir: Path) -> int:
    operator, requester = api_keys(settings.resolved_database_url,
                                   operator_client="demo-ops", requester_client="demo-shop")
    say("3/7  Registering dataset, samples, model and version 1 over HTTP", bold=True)
    policy = {"batching": {"max_batch": subjects, "max_wait_seconds": 30},
              "training_recipe": world.recipe.to_dict()}
    register_world(api, operator, world, store, dataset=DATASET, model=MODEL, policy=policy)
    counts = api.get(f"/v1/datasets/{DATASET}", headers=operator).json()["samples"]
    say(f"     {counts['train']} training, {counts['holdout']} holdout and {counts['test']} "
        "test samples; subjects stored as keyed hashes only")
    served = _predict(api, requester, store)
    say(f"     predict answers with version {served}")

    say(f"4/7  {subjects} data subjects ask to be forgotten", bold=True)
    owners = subjects_in(store, subjects)
    submitted = time.monotonic()
    ids = []
    for owner in owners:
        response = api.post(URL, json={"kind": "subject", "subject_ref": owner},
                            headers={**requester, "Idempotency-Key": f"demo-{owner}"})
        response.raise_for_status()
        body = response.json()
        ids.append(body["id"])
        say(f"     {owner}: {body['status']}, {body['targets'][0]['sample_count']} samples, "
            f"due in {body['days_left']} days")

    say("5/7  Batching, unlearning (match) and the membership-inference gate", bold=True)
    last = ""
    while True:
        statuses = [api.get(f"{URL}/{i}", headers=requester).json()["status"] for i in ids]
        jobs = api.get("/v1/jobs", headers=operator).json()["items"]
        if jobs:
            job = jobs[0]
            line = (f"     job {job['id'][:8]} {job['status']:<10} {job['phase'] or '':<28} "
                    f"{job['percent']:5.1f}%  " + " ".join(
                        f"{k}={v:.3f}" for k, v in sorted(job["metrics"].items())
                        if isinstance(v, float))[:90])
            if line != last:
                say(line)
                last = line
        if all(s in ("completed", "failed") for s in statuses):
            break
        time.sleep(1)
    elapsed = time.monotonic() - submitted
    if "failed" in statuses:
        say("     The gate rejected the candidate; the served version is unchanged.", fg="red")
        job = api.get("/v1/jobs", headers=operator).json()["items"][0]
        say(f"     {job['failure_reason']}", fg="red")
        return 1

    say(f"6/7  Published {elapsed:.0f} s after the requests", bold=True)
    versions = api.get(f"/v1/models/{MODEL}/versions", headers=operator).json()
    new = versions[-1]
    summary = new["verification_report"]["summary"]
    say(f"     version {new['number']} ({new['status']}), sha256 {new['sha256'][:16]}..., "
        f"version 1 is now {versions[0]['status']}")
    if "mia_accuracy" in summary:
        low, high = summary["mia_ci95"]
        say(f"     membership attack on the {summary['n_forget']} forgotten samples: accuracy "
            f"{summary['base_mia_accuracy']:.3f} before -> {summary['mia_accuracy']:.3f} "
            f"after (95% CI {low:.3f}-{high:.3f}; 0.5 = cannot tell them from unseen data)")
    if "ks_p_value" in summary:
        say(f"     per-sample KS test p = {summary['ks_p_value']:.3f} (forget losses look like "
            "unseen data above 0.01)")
    say(f"     test accuracy {summary['base_test_accuracy']:.3f} -> "
        f"{summary['test_accuracy']:.3f}; method {summary['method']}")
    served = _predict(api, requester, store)
    say(f"     predict now answers with version {served}, no restart")

    say("7/7  Certificates", bold=True)
    from app.certificates import signing

    public = api.get("/v1/certificates/public-key").json()
    (data_dir / "public-key.pem").write_text(public["pem"])
    key = signing.load_public_key(public["pem"])
    for request_id in ids:
        document = api.get(f"{URL}/{request_id}/certificate", headers=requester).json()
        path = data_dir / f"certificate-{request_id}.json"
        path.write_text(json.dumps(document, indent=1))
        valid, reason = signing.verify_document(document, key)
        if not valid:
            say(f"     {request_id}: {reason}", fg="red")
            return 1
    say(f"     {len(ids)} certificates signed (Ed25519, key {public['key_id']}) and verified; "
        f"e.g. {path.name}")
    say(f"     check one offline: lethe certificate verify {path} --public-key "
        f"{data_dir / 'public-key.pem'}")
    return 0


def _predict(api: httpx.Client, headers: dict[str, str], store: Path) -> int:
    from unlearning.data.store import load_samples

    row = next(r for r in iter_manifest(store) if r["split"] == "test")
    pixels = load_samples(store, [str(row["locator"])]).x[0].float().div(255).tolist()
    response = api.post(f"/v1/models/{MODEL}/predict", json={"inputs": [pixels]},
                        headers=headers)
    response.raise_for_status()
    return int(response.json()["model_version"])


def _healthy(api: httpx.Client) -> bool:
    try:
        return api.get("/readyz").status_code == 200
    except httpx.HTTPError:
        return False


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise click.ClickException(f"{what} did not come up in {timeout:.0f} s")
        time.sleep(0.5)
