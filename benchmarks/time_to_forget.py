"""Time to forget: how long a data subject waits, from its request to a verified, published
model and a signed certificate, with the whole service running as deployed on the embedded
default: the API, a Celery worker and beat as separate processes, the embedded broker, SQLite.

    .venv/bin/python benchmarks/time_to_forget.py [--rate 0.5] [--duration 120]
        [--max-wait 15,60] [--max-batch 256] [--n-pool 20000]

Subject requests arrive over HTTP as a Poisson stream (``--rate`` per second, for
``--duration`` seconds, each for a different subject). The model's batching policy decides when
a job starts: when ``max_batch`` requests wait, or when the oldest has waited
``max_wait_seconds``. Every request is then followed until it completes (or fails), its
certificate is fetched and verified against the service's public key, and its time to forget
is read from its own timestamps: received -> completed. One fresh deployment per max-wait.

The world is the batching benchmark's (Fashion-MNIST, cnn-small, cached under
.lethe/bench-cache). Writes benchmarks/results/time-to-forget-fashion-mnist.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from app.certificates import signing  # noqa: E402
from benchmarks.common import RESULTS, free_port, machine, service_world, write_results  # noqa: E402
from worker.world import World, api_keys, register_world, subjects_in  # noqa: E402

MODEL = "fashion-cnn"
URL = "/v1/deletion-requests"
DONE = ("completed", "failed", "rejected", "canceled")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{what} not ready after {timeout:.0f} s")


def run_once(world: World, workdir: Path, *, rate: float, duration: float, max_wait: float,
             max_batch: int, seed: int, drain_timeout: float) -> dict[str, Any]:
    data_dir = workdir / f"wait-{max_wait:g}"
    os.environ.update({"LETHE_DATA_DIR": str(data_dir), "LETHE_DATABASE_URL": "",
                       "LETHE_BROKER_URL": "", "LETHE_BATCH_INTERVAL_SECONDS": "1",
                       "LETHE_LOG_FORMAT": "text", "LETHE_ACCESS_LOG": "false",
                       "LETHE_SECRET_KEY": "time-to-forget", "LETHE_DEVICE": "cpu"})
    from app.cli import ensure_schema
    from app.core.config import get_settings
    from worker.embedded_broker import EmbeddedBroker
    from worker.processes import start_services, stop_services

    get_settings.cache_clear()
    settings = get_settings()
    store = settings.resolved_dataset_dir / world.store
    shutil.copytree(world.weights.parent.parent / "datasets" / world.store, store)
    ensure_schema(settings.resolved_database_url)
    operator, requester = api_keys(settings.resolved_database_url)
    broker = EmbeddedBroker(settings.embedded_broker_socket)
    broker.start()
    port = free_port()
    processes = start_services("127.0.0.1", port, log_dir=str(data_dir))
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as api:
            wait_for(lambda: api.get("/healthz").status_code == 200, 120, "the API")
            register_world(api, operator, world, store, dataset="fashion", model=MODEL,
                           policy={"batching": {"max_batch": max_batch,
                                                "max_wait_seconds": max_wait},
                                   # latency without the reference job: gate_power.py prices it
                                   "verification": {"require_references": False,
                                                    "build_references_on_register": False},
                                   "training_recipe": world.recipe.to_dict()})
            return drive(api, operator, requester, store, rate=rate, duration=duration,
                         seed=seed, drain_timeout=drain_timeout) | {"max_wait_seconds": max_wait,
                                                                    "max_batch": max_batch}
    finally:
        stop_services(processes)
        broker.stop()


def drive(api: httpx.Client, operator: dict[str, str], requester: dict[str, str], store: Path,
          *, rate: float, duration: float, seed: int, drain_timeout: float) -> dict[str, Any]:
    rng = random.Random(seed)
    arrivals: list[float] = []
    clock = rng.expovariate(rate)
    while clock < duration:
        arrivals.append(clock)
        clock += rng.expovariate(rate)
    owners = subjects_in(store, len(arrivals))
    started = time.monotonic()
    ids: list[str] = []
    for owner, at in zip(owners, arrivals, strict=True):
        time.sleep(max(0.0, started + at - time.monotonic()))
        response = api.post(URL, json={"kind": "subject", "subject_ref": owner},
                            headers={**requester, "Idempotency-Key": f"ttf-{owner}"})
        response.raise_for_status()
        ids.append(response.json()["id"])
    deadline = time.monotonic() + drain_timeout
    requests: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        requests = {i: api.get(f"{URL}/{i}", headers=requester).json() for i in ids}
        if all(r["status"] in DONE for r in requests.values()):
            break
        time.sleep(2)
    public = signing.load_public_key(api.get("/v1/certificates/public-key").json()["pem"])
    waits, verified, failed, unfinished = [], 0, 0, 0
    for request_id, request in requests.items():
        if request["status"] != "completed":
            failed += request["status"] == "failed"
            unfinished += request["status"] not in DONE
            continue
        received = datetime.fromisoformat(request["received_at"])
        completed = datetime.fromisoformat(request["completed_at"])
        waits.append((completed - received).total_seconds())
        certificate = api.get(f"{URL}/{request_id}/certificate", headers=requester)
        verified += certificate.status_code == 200 and signing.verify_document(
            certificate.json(), public)[0]
    jobs = api.get("/v1/jobs", headers=operator, params={"limit": 100}).json()["items"]
    finished_jobs = [j for j in jobs if j["status"] in ("succeeded", "failed")]
    return {
        "rate_per_s": rate, "duration_s": duration, "requests": len(ids),
        "completed": len(waits), "failed": failed, "unfinished": unfinished,
        "certificates_verified": verified, "jobs": len(jobs),
        "jobs_by_status": {s: sum(j["status"] == s for j in jobs)
                           for s in sorted({j["status"] for j in jobs})},
        "requests_per_job": round(len(ids) / max(len(finished_jobs), 1), 1),
        "time_to_forget_s": {
            "mean": round(statistics.fmean(waits), 1) if waits else None,
            "p50": round(percentile(waits, 0.5), 1) if waits else None,
            "p90": round(percentile(waits, 0.9), 1) if waits else None,
            "max": round(max(waits), 1) if waits else None},
        "wall_s": round(time.monotonic() - started, 1),
    }


def markdown(result: dict[str, Any]) -> str:
    m, w = result["machine"], result["world"]
    lines = [
        "# Time to forget: request to published model and signed certificate", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; load average at the "
        f"start {m['load_average'][0]:.1f}. Run {result['started_at']}.",
        f"Deployment: the embedded default as `lethe up` runs it (API, Celery worker and beat "
        f"as processes, the embedded broker, SQLite), beat's batcher every 1 s. World: "
        f"{w['dataset']}, {w['train']} training images, cnn-small (train accuracy "
        f"{w['train_accuracy']:.3f}, test {w['test_accuracy']:.3f}); policy method `match`.",
        f"Load: subject requests as a Poisson stream of {result['rate']} per second for "
        f"{result['duration']} s, each for a different subject.", "",
        "| max wait (s) | requests | completed | certificates verified | jobs | requests per "
        "job | time to forget p50 (s) | p90 | max |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in result["runs"]:
        t = run["time_to_forget_s"]
        lines.append(
            f"| {run['max_wait_seconds']:g} | {run['requests']} | {run['completed']} | "
            f"{run['certificates_verified']} | {run['jobs']} | {run['requests_per_job']} | "
            f"{t['p50']} | {t['p90']} | {t['max']} |")
    lines += ["", "Time to forget is each request's `completed_at - received_at`, as the API "
              "reports it: the wait for its batch, the job (load, unlearn, verify, publish) "
              "and any wait behind the job before it. A failed or unfinished request would be "
              "listed; none is left out of the count."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=0.5, help="requests per second")
    parser.add_argument("--duration", type=float, default=120, help="seconds of arrivals")
    parser.add_argument("--max-wait", default="15,60", help="batching windows to compare")
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--n-pool", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--drain-timeout", type=float, default=900)
    parser.add_argument("--out", default=str(RESULTS / "time-to-forget-fashion-mnist"))
    args = parser.parse_args()
    world, train = service_world(args.n_pool)
    result: dict[str, Any] = {
        "started_at": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(), "rate": args.rate, "duration": args.duration,
        "world": {"dataset": world.dataset, "train": train, **world.metrics}, "runs": []}
    with tempfile.TemporaryDirectory(prefix="lethe-ttf-") as workdir:
        for max_wait in (float(w) for w in args.max_wait.split(",")):
            run = run_once(world, Path(workdir), rate=args.rate, duration=args.duration,
                           max_wait=max_wait, max_batch=args.max_batch, seed=args.seed,
                           drain_timeout=args.drain_timeout)
            print(json.dumps(run), flush=True)
            result["runs"].append(run)
    write_results(args.out, result, markdown)


if __name__ == "__main__":
    main()
