"""`lethe demo`: the mission end to end on the embedded default, narrated.

Fashion-MNIST (or scikit-learn's digits, saying so, where it cannot be fetched) becomes a
sample store with pseudonymous subjects; an original model is trained on it and registered
over HTTP like an operator would; API, worker, beat and the embedded broker start; a
reference job trains reference models for per-sample evidence while the first requests wait;
subjects chosen at random ask to be forgotten over HTTP; the batch is unlearned, tested
sample by sample and by the population attack, published and served; each request gets a
certificate stating its evidence, verified here."""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import click
import httpx

from unlearning.data.catalog import iter_manifest
from unlearning.training import Recipe
from worker.world import World, api_keys, build_world, register_world

MODEL = "fashion-classifier"
DATASET = "fashion"
URL = "/v1/deletion-requests"


def say(message: str = "", **style: Any) -> None:
    click.secho(message, **style)


# The demo's world: 2 800 training and 1 200 holdout images. Its 8 reference models (each on
# 1 400 images with the original's recipe) train in about a minute and a half on two cores.
N_POOL, HOLDOUT_FRACTION = 4000, 0.3
REFERENCES = 8
STEPS = 8


def run_demo(data_dir: Path, *, port: int, subjects: int, seed: int | None = None) -> int:
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

    say(f"1/{STEPS}  Data and the original model", bold=True)
    world = build_world(world_root, data_dir=data_dir.parent, n_pool=N_POOL, n_test=2000,
                        holdout_fraction=HOLDOUT_FRACTION,
                        recipe=Recipe(epochs=30, lr=0.05, weight_decay=0.0))
    if world.dataset != "fashion-mnist":
        say("     Fashion-MNIST could not be fetched: using scikit-learn's digits instead.",
            fg="yellow")
    say(f"     {world.dataset}: cnn-small trained to train accuracy "
        f"{world.metrics['train_accuracy']:.3f}, test accuracy "
        f"{world.metrics['test_accuracy']:.3f} (the gap is what a membership attack reads)")
    store = settings.resolved_dataset_dir / world.store
    shutil.copytree(world_root / "datasets" / world.store, store)

    say(f"2/{STEPS}  Starting API, worker, beat and the embedded broker", bold=True)
    from app.cli import ensure_schema
    from worker.embedded_broker import EmbeddedBroker
    from worker.processes import start_services, stop_services

    ensure_schema(settings.resolved_database_url)
    broker = EmbeddedBroker(settings.embedded_broker_socket)
    broker.start()
    processes = start_services("127.0.0.1", port, log_dir=str(data_dir))
    try:
        base_url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base_url, timeout=60) as api:
            _wait(lambda: _healthy(api), 120, "the API")
            say(f"     API on {base_url}/docs, logs in {data_dir}")
            outcome = _drive(api, settings, world, store, subjects, data_dir,
                             random.Random(seed))
    finally:
        stop_services(processes)
        broker.stop()
    say(f"Done in {time.monotonic() - started:.0f} s.", bold=True)
    return outcome


def _drive(api: httpx.Client, settings: Any, world: World, store: Path, subjects: int,
           data_dir: Path, rng: random.Random) -> int:
    operator, requester = api_keys(settings.resolved_database_url,
                                   operator_client="demo-ops", requester_client="demo-shop")
    say(f"3/{STEPS}  Registering dataset, samples, model and version 1 over HTTP", bold=True)
    policy = {"batching": {"max_batch": subjects, "max_wait_seconds": 30},
              "verification": {"references": REFERENCES, "require_references": True,
                               "build_references_on_register": True},
              "training_recipe": world.recipe.to_dict()}
    register_world(api, operator, world, store, dataset=DATASET, model=MODEL, policy=policy)
    counts = api.get(f"/v1/datasets/{DATASET}", headers=operator).json()["samples"]
    say(f"     {counts['train']} training, {counts['holdout']} holdout and {counts['test']} "
        "test samples; subjects stored as keyed hashes only")
    served = _predict(api, requester, store)
    say(f"     predict answers with version {served}")

    say(f"4/{STEPS}  {subjects} data subjects, chosen at random, ask to be forgotten",
        bold=True)
    owners = _random_subjects(store, subjects, rng)
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
    waiting = api.get(f"{URL}/{ids[0]}", headers=requester).json()["targets"][0]["waiting_for"]
    if waiting:
        say(f"     they wait: {waiting}")

    say(f"5/{STEPS}  Reference job: {REFERENCES} reference models on random halves of the "
        "training set, kept only as per-sample statistics", bold=True)
    reference = _follow_references(api, operator)
    if reference["status"] != "ready":
        say(f"     the reference job failed: {reference['failure_reason']}", fg="red")
        return 1
    say(f"     ready: {reference['statistics']} statistics from {reference['references']} "
        f"models in {reference['cost_seconds']:.0f} s; no reference weights were kept")

    say(f"6/{STEPS}  Batching, unlearning (match) and verification", bold=True)
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

    say(f"7/{STEPS}  Published {elapsed:.0f} s after the requests", bold=True)
    versions = api.get(f"/v1/models/{MODEL}/versions", headers=operator).json()
    new = versions[-1]
    report = new["verification_report"]
    summary = report["summary"]
    say(f"     version {new['number']} ({new['status']}), sha256 {new['sha256'][:16]}..., "
        f"version 1 is now {versions[0]['status']}; {summary.get('method')} ran "
        f"{summary.get('method_steps')} steps, weights changed: "
        f"{summary.get('weights_changed')} (outcome: {summary.get('outcome')})")
    _narrate_per_sample(report)
    if "mia_accuracy" in summary:
        low, high = summary["mia_ci95"]
        say(f"     second check, population attack on all {summary['n_forget']} samples: "
            f"accuracy {summary['base_mia_accuracy']:.3f} before -> "
            f"{summary['mia_accuracy']:.3f} after (95% CI {low:.3f}-{high:.3f})")
    if "ks_p_value" in summary:
        say(f"     second check, KS test on their losses: p = {summary['ks_p_value']:.3f}")
    say(f"     test accuracy {summary['base_test_accuracy']:.3f} -> "
        f"{summary['test_accuracy']:.3f}")
    served = _predict(api, requester, store)
    say(f"     predict now answers with version {served}, no restart")

    say(f"8/{STEPS}  Certificates", bold=True)
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
        f"e.g. {path.name}:")
    entry = json.loads(path.read_text())["certificate"]["models"][0]
    say(f"     evidence: {entry['evidence']}, outcome: {entry['outcome']}")
    say(f"     \"{entry['statement']}\"")
    say(f"     check one offline: lethe certificate verify {path} --public-key "
        f"{data_dir / 'public-key.pem'}")
    return 0


def _random_subjects(store: Path, n: int, rng: random.Random) -> list[str]:
    """``n`` subjects drawn at random from those owning training samples: a real batch is
    whoever asked, not the subjects a model happens to remember."""
    owners = sorted({str(row["subject_ref"]) for row in iter_manifest(store)
                     if row["split"] == "train"})
    return rng.sample(owners, min(n, len(owners)))


def _follow_references(api: httpx.Client, operator: dict[str, str]) -> dict[str, Any]:
    shown: tuple[str, int] | None = None
    while True:
        reference = api.get(f"/v1/models/{MODEL}/references",
                            headers=operator).json()["items"][0]
        if (reference["status"], reference["completed"]) != shown:
            shown = (reference["status"], reference["completed"])
            say(f"     reference set {reference['id']}: {reference['status']}, "
                f"{reference['completed']}/{reference['references']} models, "
                f"{reference['cost_seconds']:.0f} s so far")
        if reference["status"] in ("ready", "failed"):
            return reference
        time.sleep(1)


def _narrate_per_sample(report: dict[str, Any]) -> None:
    per_sample = report.get("per_sample")
    if not per_sample:
        say(f"     evidence: {report.get('evidence')} ({report.get('per_sample_note')})",
            fg="yellow")
        return
    rows = per_sample["requests"]
    say(f"     per-sample test, each subject's samples against {per_sample['references']} "
        f"reference models that never saw them (alpha {per_sample['alpha']}, "
        "Benjamini-Hochberg across the batch):")
    for row in rows:
        if not row["n_testable"]:
            say(f"       {row['request_id'][:8]}: not testable ({row['n']} samples)")
            continue
        say(f"       {row['request_id'][:8]}: {row['n_testable']} samples, p before "
            f"{row['p_before']:.3f}{' (memorised)' if row['flagged_before'] else ''}"
            f" -> after {row['p_value']:.3f}; detects a shift of "
            f"{row['detectable_shift']:.2f} sd")
    before = per_sample["n_flagged_before"]
    say(f"     {before} of {len(rows)} subjects were detectably memorised before; "
        f"{per_sample['n_flagged']} after. The others were not detectable at this power: "
        "the test cannot say they were memorised, nor that they were not.")


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
