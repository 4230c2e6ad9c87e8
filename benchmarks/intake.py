"""Intake benchmark: throughput and p50/p99 latency of ``POST /v1/deletion-requests`` on
PostgreSQL, side by side in the same run with a bare FastAPI endpoint doing one INSERT into the
same database (the ceiling, benchmarks/ceiling_app.py).

    .venv/bin/python benchmarks/intake.py [--duration 30] [--connections 16 64] [--rounds 2]

What it does:
1. installs wrk if missing (apt-get), creates a throwaway PostgreSQL database and migrates it;
2. starts Lethe (`lethe serve --workers 2`, as deployed) and the ceiling app (uvicorn, two
   workers), both up for the whole run;
3. seeds a dataset of SUBJECTS x SAMPLES_PER_SUBJECT samples and a model over the API, and
   creates a requester key;
4. warms both up, then for each connection count runs wrk (benchmarks/intake.lua: subject
   requests for random subjects, a unique Idempotency-Key each) for a fixed duration against
   each side in turn, alternating which goes first, recording the CPU the servers, PostgreSQL,
   wrk and everything else on the machine used meanwhile;
5. checks the audit chain is intact and every answered request was recorded, drops the
   database, and writes benchmarks/results/intake-postgres.{json,md}.

The figure to compare is the ratio of the best throughput of each side measured in this run:
absolute numbers move with whatever else the machine is running. CPU per request (server and
PostgreSQL) is reported beside it: on a saturated machine the ratio of those costs is what the
throughput ratio tends to.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, func, select, text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.audit import service as audit  # noqa: E402
from app.audit.models import AuditEvent  # noqa: E402
from app.auth import service as keys  # noqa: E402
from app.auth.models import Role  # noqa: E402
from app.core import migrate  # noqa: E402
from app.core.db import make_engine, make_sessionmaker, session_scope  # noqa: E402
from app.requests.models import DeletionRequest  # noqa: E402
from benchmarks.common import free_port  # noqa: E402
from unlearning.machine import describe  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
LUA_SCRIPT = BENCH_DIR / "intake.lua"
ADMIN_URL = os.environ.get("LETHE_BENCH_POSTGRES_URL",
                           "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
SUBJECTS = 10_000
SAMPLES_PER_SUBJECT = 5
HOLDOUT = 1_000
TARGET_RATIO = 0.7
WRK_THREADS = 2
SECRET_KEY = "intake-benchmark-secret"
MLP = {"name": "mlp",
       "kwargs": {"in_channels": 1, "input_size": 8, "num_classes": 10, "hidden": 16}}
WORKERS = 2
# Lethe runs as deployed: `lethe serve` (uvicorn, JSON logs with the app's access log line per
# request, multiprocess metrics). The ceiling runs as plain uvicorn with no access log.
LETHE_COMMAND = ["-c", "from worker.cli import main; main()", "serve", "--workers", str(WORKERS),
                 "--no-migrate"]
CEILING_COMMAND = ["-m", "uvicorn", "--app-dir", str(Path(__file__).resolve().parent),
                   "ceiling_app:create_app", "--factory", "--workers", str(WORKERS),
                   "--log-level", "warning", "--no-access-log"]
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Connections per worker, the same for both sides: pool size, then overflow. Both servers stay
# up for the whole run, and with Lethe's default (20 + 20 per worker) the two of them could
# ask for 160 connections, past PostgreSQL's default max_connections of 100. No overflow: the
# backends live as long as the run, so their CPU can be counted (and none is spent forking).
POOL_SIZE, MAX_OVERFLOW = 12, 0


# ---- the machine --------------------------------------------------------------------------


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    print("wrk not found; installing it with apt-get", flush=True)
    subprocess.run(["apt-get", "install", "-y", "wrk"], check=True,
                   stdout=subprocess.DEVNULL)
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("wrk is not installed and apt-get could not install it")
    return found


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def top_processes(limit: int = 5) -> list[str]:
    """The busiest processes right now, as `ps` sees them (CPU share since each started)."""
    out = subprocess.run(["ps", "-eo", "pid,pcpu,etime,args", "--sort=-pcpu"],
                         capture_output=True, text=True).stdout.splitlines()
    return [line.strip()[:160] for line in out[1:limit + 1]]


def versions(wrk: str) -> dict[str, str]:
    found = {name: importlib_metadata.version(name) for name in (
        "fastapi", "starlette", "uvicorn", "uvloop", "httptools", "pydantic", "sqlalchemy",
        "psycopg")}
    found["python"] = platform.python_version()
    found["wrk"] = subprocess.run([wrk, "--version"], capture_output=True, text=True
                                  ).stdout.splitlines()[0].strip()
    engine = create_engine(ADMIN_URL)
    with engine.connect() as connection:
        found["postgresql"] = str(connection.scalar(text("SHOW server_version")))
    engine.dispose()
    return found


def describe_machine(wrk: str) -> dict[str, Any]:
    """The engine's description of the machine, with its load and the software measured."""
    return {**describe(), "loadavg_before": loadavg(), "busiest_before": top_processes(),
            "versions": versions(wrk)}


@dataclass
class ProcessTimes:
    """CPU ticks of every process, by pid, with what each is (to attribute them)."""

    ticks: dict[int, int]
    session: dict[int, int]
    name: dict[int, str]  # the command; for PostgreSQL backends, their title (with the db)
    total_ticks: int  # all CPUs, busy and idle, from /proc/stat
    idle_ticks: int

    @classmethod
    def snapshot(cls) -> ProcessTimes:
        ticks, session, name = {}, {}, {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                raw = (entry / "stat").read_text()
                comm = raw[raw.index("(") + 1:raw.rindex(")")]
                if comm == "postgres":
                    comm = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, ValueError):
                continue
            fields = raw[raw.rindex(")") + 2:].split()
            pid = int(entry.name)
            ticks[pid] = int(fields[11]) + int(fields[12])  # utime + stime
            session[pid] = int(fields[3])
            name[pid] = comm
        cpu = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return cls(ticks, session, name, sum(cpu), cpu[3] + cpu[4])  # idle + iowait


def cpu_breakdown(before: ProcessTimes, after: ProcessTimes, sessions: dict[int, str],
                  database: str, wrk_seconds: float) -> dict[str, Any]:
    """Where the machine's CPU went between two snapshots, in cores (1.0 = one core busy).
    wrk has exited by the second snapshot: its CPU comes from our children's rusage."""
    wall_ticks = (after.total_ticks - before.total_ticks) / (os.cpu_count() or 1)
    if wall_ticks <= 0:
        return {}
    busy = 1 - (after.idle_ticks - before.idle_ticks) / (after.total_ticks - before.total_ticks)
    groups: dict[str, float] = {"wrk": wrk_seconds * CLK_TCK / wall_ticks}
    others: dict[str, float] = {}
    for pid, ticks in after.ticks.items():
        used = ticks - before.ticks.get(pid, 0)
        if used <= 0:
            continue
        cores = used / wall_ticks
        if after.session[pid] in sessions:
            group = sessions[after.session[pid]]
        elif f" {database} " in after.name[pid]:
            group = "postgresql (benchmark database)"
        elif after.name[pid].startswith("postgres"):
            group = "postgresql (other databases, background)"
        else:
            group = "other processes"
            command = after.name[pid][:40]
            others[command] = others.get(command, 0.0) + cores
        groups[group] = groups.get(group, 0.0) + cores
    busiest_others = sorted(others.items(), key=lambda item: -item[1])[:3]
    return {"machine_busy_cores": round(busy * (os.cpu_count() or 1), 2),
            "cores": {k: round(v, 2) for k, v in sorted(groups.items())},
            "busiest_other": {k: round(v, 2) for k, v in busiest_others}}


# ---- database and servers -----------------------------------------------------------------


def database_url(name: str) -> str:
    return ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


@contextmanager
def throwaway_database() -> Iterator[str]:
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"lethe_bench_{uuid.uuid4().hex[:10]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield database_url(name)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"{self.name} exited; see {self.log}:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"{self.name} did not become ready; see {self.log}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start_server(name: str, command: list[str], env: dict[str, str], workdir: Path) -> Server:
    port = free_port()
    log = workdir / f"{name}.log"
    process = subprocess.Popen(
        [sys.executable, *command, "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env={**os.environ, **env}, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True)  # its own session: stopped as a group, its CPU attributed
    return Server(name, port, process, log)


def seed(lethe: Server, url: str) -> str:
    """A dataset and a model over the API, as an operator would; returns a requester key."""
    engine = make_engine(url)
    with session_scope(make_sessionmaker(engine)) as db_session:
        _, operator_key = keys.create(db_session, role=Role.operator, client_id="lethe-ops")
        _, requester_key = keys.create(db_session, role=Role.requester, client_id="acme")
    engine.dispose()
    operator = {"Authorization": f"Bearer {operator_key}"}
    lines = []
    for subject in range(SUBJECTS):
        for j in range(SAMPLES_PER_SUBJECT):
            index = subject * SAMPLES_PER_SUBJECT + j
            lines.append(json.dumps({
                "sample_key": f"s-{index:07d}", "subject_ref": f"customer-{subject}",
                "label": index % 10, "split": "train", "locator": f"train.safetensors#{index}"}))
    for index in range(HOLDOUT):
        lines.append(json.dumps({
            "sample_key": f"h-{index:07d}", "subject_ref": None, "label": index % 10,
            "split": "holdout", "locator": f"holdout.safetensors#{index}"}))
    with httpx.Client(base_url=lethe.url, headers=operator, timeout=600) as client:
        for method, path, kwargs in (
            ("POST", "/v1/datasets", {"json": {"name": "customers"}}),
            ("POST", "/v1/datasets/customers/samples", {
                "content": ("\n".join(lines) + "\n").encode(),
                "headers": {"Content-Type": "application/x-ndjson"}}),
            ("POST", "/v1/models", {"json": {"name": "churn-mlp", "architecture": MLP,
                                             "dataset": "customers"}}),
        ):
            response = client.request(method, path, **kwargs)
            if response.status_code >= 300:
                raise SystemExit(f"seeding failed: {method} {path}: {response.status_code} "
                                 f"{response.text[:500]}")
        # One request by hand: the benchmark measures the path that queues a target.
        probe = client.post("/v1/deletion-requests", json={
            "kind": "subject", "subject_ref": "customer-1"}, headers={
            "Authorization": f"Bearer {requester_key}", "Idempotency-Key": "probe"})
        body = probe.json()
        if probe.status_code != 202 or body["status"] != "queued" or len(body["targets"]) != 1:
            raise SystemExit(f"intake probe failed: {probe.status_code} {probe.text[:500]}")
    return requester_key


# ---- load -----------------------------------------------------------------------------------


@dataclass
class Run:
    side: str
    connections: int
    round: int
    requests: int
    accepted: int  # 2xx answers
    errors: int
    duration_s: float
    requests_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    error_kinds: dict[str, int]
    loadavg_after: list[float]
    # CPU per answered request, in ms: the side's server processes, and the PostgreSQL
    # backends of the benchmark database (only this side talks to them meanwhile).
    server_cpu_ms: float
    postgres_cpu_ms: float
    cpu: dict[str, Any] = field(default_factory=dict)


def run_wrk(wrk: str, server: Server, *, connections: int, duration: int, run_id: str,
            api_key: str) -> dict[str, Any]:
    command = [wrk, "-t", str(min(WRK_THREADS, connections)), "-c", str(connections),
               "-d", f"{duration}s", "--timeout", "10s", "--latency", "-s", str(LUA_SCRIPT),
               f"{server.url}/v1/deletion-requests", "--", run_id, str(SUBJECTS), api_key]
    out = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60)
    match = re.search(r"^WRK_RESULT (\{.*\})$", out.stdout, re.MULTILINE)
    if out.returncode != 0 or match is None:
        raise SystemExit(f"wrk failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    result: dict[str, Any] = json.loads(match.group(1))
    return result


def measure(wrk: str, server: Server, *, connections: int, duration: int, round_: int,
            api_key: str, sessions: dict[int, str], database: str) -> Run:
    before = ProcessTimes.snapshot()
    wrk_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    raw = run_wrk(wrk, server, connections=connections, duration=duration,
                  run_id=f"{server.name}-c{connections}-r{round_}-{uuid.uuid4().hex[:8]}",
                  api_key=api_key)
    after = ProcessTimes.snapshot()
    wrk_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk_seconds = (wrk_after.ru_utime + wrk_after.ru_stime
                   - wrk_before.ru_utime - wrk_before.ru_stime)
    error_kinds = {kind: raw[kind] for kind in ("status_errors", "timeouts", "connect_errors",
                                                 "read_errors", "write_errors") if raw[kind]}
    seconds = raw["duration_us"] / 1e6
    accepted = max(raw["requests"] - raw["status_errors"], 1)
    cpu = cpu_breakdown(before, after, sessions, database, wrk_seconds)
    cores = cpu.get("cores", {})
    run = Run(
        side=server.name, connections=connections, round=round_, requests=raw["requests"],
        accepted=raw["requests"] - raw["status_errors"],
        errors=sum(error_kinds.values()), duration_s=round(seconds, 2),
        requests_per_s=round((raw["requests"] - raw["status_errors"]) / seconds, 1),
        p50_ms=raw["latency_p50_us"] / 1000, p90_ms=raw["latency_p90_us"] / 1000,
        p99_ms=raw["latency_p99_us"] / 1000, max_ms=raw["latency_max_us"] / 1000,
        error_kinds=error_kinds, loadavg_after=loadavg(),
        server_cpu_ms=round(cores.get(f"{server.name} server", 0) * seconds * 1000 / accepted,
                            3),
        postgres_cpu_ms=round(cores.get("postgresql (benchmark database)", 0) * seconds * 1000
                              / accepted, 3),
        cpu=cpu)
    print(f"  {run.side:8} c={connections:<3} round {round_}: {run.requests_per_s:8.1f} req/s  "
          f"p50 {run.p50_ms:7.1f} ms  p99 {run.p99_ms:7.1f} ms  errors {error_kinds or 0}  "
          f"cpu/request: server {run.server_cpu_ms:.2f} ms, postgres {run.postgres_cpu_ms:.2f} "
          f"ms; machine busy {cpu.get('machine_busy_cores')} cores, other processes "
          f"{cores.get('other processes', 0):.2f}", flush=True)
    return run


def analyze(url: str) -> None:
    """Planner statistics for tables that were empty a moment ago, as autovacuum keeps them
    in a running deployment (it gets there on its own within a minute or two of load)."""
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text("ANALYZE"))
    engine.dispose()


def check_database(url: str, accepted: int) -> dict[str, Any]:
    """The guarantees still hold after the load: the audit chain is intact and every answered
    request was recorded (a few more may be: those still in flight when wrk stopped)."""
    engine = make_engine(url)
    with session_scope(make_sessionmaker(engine)) as db_session:
        verification = audit.verify_chain(db_session)
        requests = db_session.scalar(select(func.count()).select_from(DeletionRequest))
        events = db_session.scalar(select(func.count()).select_from(AuditEvent))
    engine.dispose()
    return {"audit_chain_ok": verification.ok, "audit_events": events,
            "deletion_requests": requests, "accepted_by_wrk_plus_probe": accepted + 1,
            "every_accepted_recorded": (requests or 0) >= accepted + 1}


# ---- report ---------------------------------------------------------------------------------


def best(runs: list[Run], side: str) -> Run:
    return max((r for r in runs if r.side == side), key=lambda r: r.requests_per_s)


def cpu_cost(runs: list[Run], side: str) -> float:
    """Median CPU (its server and its PostgreSQL backends) per request of one side's runs."""
    costs = sorted(r.server_cpu_ms + r.postgres_cpu_ms for r in runs if r.side == side)
    return costs[len(costs) // 2]


def code_state() -> dict[str, Any]:
    """The commit measured, and what in the working tree differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True
                              ).stdout

    return {"commit": git("rev-parse", "--short", "HEAD").strip(),
            "uncommitted": [line.strip() for line in git(
                "status", "--porcelain", "--", "app", "worker", "migrations").splitlines()]}


def per_connections(runs: list[dict[str, Any]]) -> list[tuple[int, float, float]]:
    """(connections, best intake req/s, best ceiling req/s) for each connection count."""
    counts = sorted({r["connections"] for r in runs})
    return [(c, *(max(r["requests_per_s"] for r in runs
                      if r["connections"] == c and r["side"] == side)
                  for side in ("intake", "ceiling"))) for c in counts]


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    machine, summary, config = report["machine"], report["summary"], report["config"]
    intake, ceiling = summary["intake"], summary["ceiling"]
    lines = [
        "# Intake benchmark on PostgreSQL",
        "",
        f"Run {report['started_at']} by `.venv/bin/python benchmarks/intake.py` on commit "
        f"{report['code']['commit']} ({config['duration_s']} s per run after a "
        f"{config['warmup_s']} s warm-up per side, connections "
        f"{', '.join(map(str, config['connections']))}, {config['rounds']} rounds per "
        "connection count, the two sides alternating which goes first).",
        "",
        f"**intake / ceiling = {summary['ratio']:.2f}** (best throughput of each side; target "
        f"{TARGET_RATIO}: {'met' if summary['target_met'] else 'NOT met'}). CPU per request, "
        "server and PostgreSQL together (median over the runs): intake "
        f"{summary['intake_cpu_ms']:.2f} ms, ceiling {summary['ceiling_cpu_ms']:.2f} ms, a ratio "
        f"of {summary['cpu_cost_ratio']:.2f}. On this machine every process competes for the "
        "same two cores, so at each connection count the throughput ratio tends to the ratio "
        "of the CPU costs at that count.",
        "",
        "| side | best at connections | requests/s | p50 ms | p99 ms | CPU ms/request: "
        "server + PostgreSQL |",
        "|---|---|---|---|---|---|",
        *[f"| {label} | {side['connections']} | {side['requests_per_s']:.0f} | "
          f"{side['p50_ms']:.1f} | {side['p99_ms']:.1f} | {side['server_cpu_ms']:.2f} + "
          f"{side['postgres_cpu_ms']:.2f} |"
          for label, side in (("intake (`POST /v1/deletion-requests`)", intake),
                              ("ceiling (one INSERT)", ceiling))],
        "",
        "Per connection count (best run of each side at that count): "
        + "; ".join(f"{c} connections: {i:.0f} / {x:.0f} = {i / x:.2f}"
                    for c, i, x in per_connections(report["runs"])) + ". Lethe records the "
        "requests that arrive together in one transaction, so the more arrive at once, the "
        "less each costs; the ceiling pays one transaction per request at any load.",
        "",
        "## Every run, in the order run",
        "",
        "CPU from /proc while each run lasted. Per request: the side's server processes and the "
        "PostgreSQL backends of the benchmark database. Machine: cores busy (of "
        f"{machine['cores']}), and how many of them went to processes that are not this "
        "benchmark (other engineers' jobs).",
        "",
        "| side | connections | round | requests/s | p50 ms | p99 ms | errors | CPU ms/request "
        "server + PostgreSQL | machine busy | other processes (busiest) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        cpu = run["cpu"]
        busiest = ", ".join(f"`{name}` {cores}" for name, cores in
                            cpu.get("busiest_other", {}).items())
        lines.append(
            f"| {run['side']} | {run['connections']} | {run['round']} | "
            f"{run['requests_per_s']:.0f} | {run['p50_ms']:.1f} | {run['p99_ms']:.1f} | "
            f"{run['errors']} | {run['server_cpu_ms']:.2f} + {run['postgres_cpu_ms']:.2f} | "
            f"{cpu.get('machine_busy_cores', 0):.2f} | "
            f"{cpu.get('cores', {}).get('other processes', 0):.2f} ({busiest}) |")
    checks = report["checks"]
    lines += [
        "",
        "## After the load",
        "",
        f"- audit chain verified: {'intact' if checks['audit_chain_ok'] else 'BROKEN'} over "
        f"{checks['audit_events']} events",
        f"- deletion requests recorded: {checks['deletion_requests']}; answered 202 to wrk "
        f"(warm-ups and the probe included): {checks['accepted_by_wrk_plus_probe']}; every "
        f"answered one recorded: {'yes' if checks['every_accepted_recorded'] else 'NO'}",
        "",
        "## Machine",
        "",
        f"- CPU: {machine['cpu']}, {machine['cores']} cores, shared by both servers' "
        f"workers, PostgreSQL and wrk; {machine['memory_gib']} GiB; Linux {machine['kernel']}",
        f"- load average before: {machine['loadavg_before']}, after: "
        f"{machine['loadavg_after']}",
        "- busiest processes before the run (ps, share since each started):",
        *[f"  - `{line}`" for line in machine["busiest_before"]],
        "- versions: " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()),
        *([f"- uncommitted changes measured with it: {', '.join(report['code']['uncommitted'])}"]
          if report["code"]["uncommitted"] else []),
        "",
        "Other engineers' jobs share this machine; absolute figures move with them, so compare "
        "only the ratio, and only between the two sides of one run.",
        "",
        "## Set-up",
        "",
        f"- Lethe: `lethe serve --workers {WORKERS}` as deployed (JSON logs with one access line "
        "per request, multiprocess metrics); ceiling: `uvicorn --app-dir benchmarks "
        f"ceiling_app:create_app --factory --workers {WORKERS} --no-access-log`; both with "
        "httptools and uvloop (uvicorn's `auto`), both up for the whole run.",
        f"- Connection pool per worker, both sides: {POOL_SIZE} (no overflow), so two servers "
        "stay under PostgreSQL's max_connections; Lethe admits as many requests at once.",
        f"- {SUBJECTS} subjects x {SAMPLES_PER_SUBJECT} train samples (+{HOLDOUT} holdout) in "
        "one dataset, one model on it, default policy; every request is a subject request for "
        "a random subject, with its own Idempotency-Key, from a requester key; each is queued "
        "with one target. The ceiling gets the same requests. `ANALYZE` after the warm-up, "
        "as autovacuum would soon after.",
        "- Lethe records the requests that arrive together in one transaction (group commit, "
        "app/requests/intake.py); each is answered only after its commit.",
        f"- wrk {WRK_THREADS} threads, benchmarks/intake.lua; throughput counts 2xx responses.",
    ]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=30, help="seconds per run")
    parser.add_argument("--warmup", type=int, default=5, help="seconds of warm-up per side")
    parser.add_argument("--connections", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--rounds", type=int, default=2,
                        help="runs per side and connection count, alternating who goes first")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "intake-postgres")
    args = parser.parse_args()

    wrk = ensure_wrk()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    machine = describe_machine(wrk)
    code = code_state()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, load "
          f"{machine['loadavg_before']}", flush=True)
    runs: list[Run] = []
    with throwaway_database() as url, tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        migrate.upgrade(url)
        from benchmarks.ceiling_app import metadata as ceiling_metadata

        ceiling_engine = create_engine(url)
        ceiling_metadata.create_all(ceiling_engine)
        ceiling_engine.dispose()
        lethe = start_server("intake", LETHE_COMMAND, {
            "LETHE_DATABASE_URL": url, "LETHE_DATA_DIR": str(workdir / "lethe"),
            "LETHE_SECRET_KEY": SECRET_KEY, "LETHE_DB_POOL_SIZE": str(POOL_SIZE),
            "LETHE_DB_MAX_OVERFLOW": str(MAX_OVERFLOW)}, workdir)
        ceiling = start_server("ceiling", CEILING_COMMAND, {
            "CEILING_DATABASE_URL": url, "CEILING_POOL_SIZE": str(POOL_SIZE),
            "CEILING_MAX_OVERFLOW": str(MAX_OVERFLOW)}, workdir)
        try:
            lethe.wait_ready()
            ceiling.wait_ready()
            print("seeding", flush=True)
            api_key = seed(lethe, url)
            sessions = {os.getsid(lethe.process.pid): "intake server",
                        os.getsid(ceiling.process.pid): "ceiling server"}
            accepted = 0
            print(f"warm-up: {args.warmup} s per side", flush=True)
            for server in (lethe, ceiling):
                raw = run_wrk(wrk, server, connections=max(args.connections),
                              duration=args.warmup, run_id=f"warmup-{uuid.uuid4().hex[:8]}",
                              api_key=api_key)
                if server is lethe:
                    accepted += raw["requests"] - raw["status_errors"]
            analyze(url)
            for connections in args.connections:
                for round_ in range(1, args.rounds + 1):
                    order = (lethe, ceiling) if round_ % 2 else (ceiling, lethe)
                    for server in order:
                        run = measure(wrk, server, connections=connections,
                                      duration=args.duration, round_=round_, api_key=api_key,
                                      sessions=sessions, database=url.rsplit("/", 1)[1])
                        runs.append(run)
                        if server is lethe:
                            accepted += run.accepted
        finally:
            lethe.stop()
            ceiling.stop()
        checks = check_database(url, accepted)
    machine["loadavg_after"] = loadavg()

    intake_best, ceiling_best = best(runs, "intake"), best(runs, "ceiling")
    ratio = intake_best.requests_per_s / ceiling_best.requests_per_s
    intake_cpu, ceiling_cpu = cpu_cost(runs, "intake"), cpu_cost(runs, "ceiling")
    report = {
        "started_at": started_at,
        "code": code,
        "config": {"duration_s": args.duration, "warmup_s": args.warmup,
                   "connections": args.connections, "rounds": args.rounds,
                   "subjects": SUBJECTS, "samples_per_subject": SAMPLES_PER_SUBJECT,
                   "lethe_command": ["python", *LETHE_COMMAND],
                   "ceiling_command": ["python", *CEILING_COMMAND], "wrk_threads": WRK_THREADS,
                   "pool_per_worker": {"size": POOL_SIZE, "max_overflow": MAX_OVERFLOW}},
        "summary": {
            "intake": asdict(intake_best), "ceiling": asdict(ceiling_best),
            "ratio": round(ratio, 3), "target_ratio": TARGET_RATIO,
            "target_met": ratio >= TARGET_RATIO,
            "intake_cpu_ms": intake_cpu, "ceiling_cpu_ms": ceiling_cpu,
            "cpu_cost_ratio": round(ceiling_cpu / intake_cpu, 3),
        },
        "runs": [asdict(r) for r in runs],
        "checks": checks,
        "machine": machine,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(args.output.with_suffix(".md"), report)
    print(f"intake  {intake_best.requests_per_s:.0f} req/s (c={intake_best.connections}, "
          f"p50 {intake_best.p50_ms:.1f} ms, p99 {intake_best.p99_ms:.1f} ms)\n"
          f"ceiling {ceiling_best.requests_per_s:.0f} req/s (c={ceiling_best.connections}, "
          f"p50 {ceiling_best.p50_ms:.1f} ms, p99 {ceiling_best.p99_ms:.1f} ms)\n"
          f"ratio   {ratio:.2f} (target {TARGET_RATIO}); audit chain "
          f"{'intact' if checks['audit_chain_ok'] else 'BROKEN'}; wrote "
          f"{args.output.with_suffix('.json')} and .md")


if __name__ == "__main__":
    main()
