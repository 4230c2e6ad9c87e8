"""Batching benchmark: time from request to published version for batches of N subject
requests on Fashion-MNIST, on the CPU, through the real pipeline.

    .venv/bin/python benchmarks/batching.py [--sizes 1,10,100] [--repeats 1]

For each batch size N: a fresh SQLite deployment (the embedded default) registers the same
original over HTTP, N subjects ask to be forgotten, the batcher makes one job of them and the
worker pipeline runs it in this process (claim, load, unlearn, verify, publish). The clock runs
from the first request's submission to the publish commit; the phases are read from the job's
timestamps. What batching buys is the ratio time(N) / time(1): a job's cost is mostly fixed
(loading the retain set, the method's step budget, the attacks), so it is shared by the batch.

Writes benchmarks/results/batching-fashion-mnist.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fastapi.testclient import TestClient  # noqa: E402

from app.core.config import Settings  # noqa: E402
from app.core.migrate import upgrade  # noqa: E402
from app.jobs import scheduled  # noqa: E402
from app.jobs.models import UnlearningJob  # noqa: E402
from app.main import create_app  # noqa: E402
from benchmarks.common import RESULTS, machine, service_world, write_results  # noqa: E402
from worker import pipeline  # noqa: E402
from worker.context import WorkerContext  # noqa: E402
from worker.world import World, api_keys, register_world, subjects_in  # noqa: E402

MODEL = "fashion-cnn"


def run_once(world: World, size: int, workdir: Path) -> dict[str, Any]:
    data_dir = workdir / f"n{size}"
    settings = Settings(data_dir=data_dir, secret_key="bench", device="cpu",
                        access_log=False, log_format="text")
    shutil.copytree(world.weights.parent.parent / "datasets" / world.store,
                    settings.resolved_dataset_dir / world.store)
    upgrade(settings.resolved_database_url)
    app = create_app(settings)
    with TestClient(app) as api:
        operator, requester = api_keys(settings.resolved_database_url)
        store = settings.resolved_dataset_dir / world.store
        # batching latency is measured without the reference job (gate_power.py prices it)
        policy = {"batching": {"max_batch": size, "max_wait_seconds": 0},
                  "verification": {"require_references": False,
                                   "build_references_on_register": False},
                  "training_recipe": world.recipe.to_dict()}
        register_world(api, operator, world, store, dataset="fashion", model=MODEL,
                       policy=policy)
        subjects = subjects_in(store, size)
        started = time.perf_counter()
        for subject in subjects:
            api.post("/v1/deletion-requests", json={"kind": "subject", "subject_ref": subject},
                     headers=requester).raise_for_status()
        submitted = time.perf_counter()
        ctx = WorkerContext(settings)
        with ctx.session() as db_session:
            (job,) = scheduled.plan_batches(db_session)
        outcome = pipeline.run(ctx, job.id)
        finished = time.perf_counter()
        with ctx.session() as db_session:
            row = db_session.get(UnlearningJob, job.id)
            assert row is not None and row.started_at and row.finished_at
            report = row.report or {}
        ctx.engine.dispose()
    app.state.engine.dispose()
    summary = report.get("summary", {})
    return {"requests": size, "outcome": outcome, "n_forget": summary.get("n_forget"),
            "seconds_to_publish": round(finished - started, 2),
            "intake_seconds": round(submitted - started, 2),
            "job_seconds": round(finished - submitted, 2),
            "method_seconds": report.get("seconds"), "method_steps": report.get("steps"),
            "mia_accuracy": summary.get("mia_accuracy"),
            "base_mia_accuracy": summary.get("base_mia_accuracy"),
            "ks_p_value": summary.get("ks_p_value"),
            "test_accuracy": summary.get("test_accuracy"),
            "base_test_accuracy": summary.get("base_test_accuracy")}


def markdown(result: dict[str, Any]) -> str:
    base = next(r for r in result["runs"] if r["requests"] == min(result["sizes"]))
    lines = [
        "# Batching: time from request to published version", "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, "
        f"torch {result['machine']['torch']}; load average at the start "
        f"{result['machine']['load_average'][0]:.1f}.",
        f"Data: {result['world']['dataset']}, {result['world']['train']} training images, "
        "cnn-small; the embedded default (SQLite); policy method `match`.", "",
        "| requests in the batch | forget samples | outcome | request → published (s) | "
        "job (s) | method (s, steps) | MIA acc before → after | ratio to 1 | s per request |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in result["runs"]:
        mia = (f"{run['base_mia_accuracy']:.3f} → {run['mia_accuracy']:.3f}"
               if run.get("mia_accuracy") is not None else f"KS p={run['ks_p_value']:.3f}"
               if run.get("ks_p_value") is not None else "—")
        lines.append(
            f"| {run['requests']} | {run['n_forget']} | {run['outcome']} | "
            f"{run['seconds_to_publish']:.1f} | {run['job_seconds']:.1f} | "
            f"{run['method_seconds']}, {run['method_steps']} | {mia} | "
            f"{run['seconds_to_publish'] / base['seconds_to_publish']:.2f} | "
            f"{run['seconds_to_publish'] / run['requests']:.2f} |")
    lines += [
        "", "What a job costs is mostly fixed (loading the retain set, the attacks, publishing); "
        "what varies is how long `match` must train before the attack is blind, and that "
        "depends on the batch, not on its size alone: a batch whose samples the original "
        "already treats like unseen data publishes after 0 steps. More than the policy's "
        "step budget (400) means the gate refused the first candidate and the job escalated "
        "to stronger settings: a larger forget set gives the gate's attack more power."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,10,100")
    parser.add_argument("--n-pool", type=int, default=60000,
                        help="Training pool drawn from Fashion-MNIST's 60 000 (train+holdout).")
    parser.add_argument("--out", default=str(RESULTS / "batching-fashion-mnist"))
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    world, train = service_world(args.n_pool)
    result: dict[str, Any] = {"machine": machine(), "sizes": sizes,
                              "world": {"dataset": world.dataset, "train": train,
                                        **world.metrics}, "runs": []}
    with tempfile.TemporaryDirectory(prefix="lethe-batching-") as workdir:
        for size in sizes:
            run = run_once(world, size, Path(workdir))
            print(json.dumps(run), flush=True)
            result["runs"].append(run)
    write_results(args.out, result, markdown)


if __name__ == "__main__":
    main()
