"""What the benchmarks share: the machine described beside every result, the world the
service benchmarks deploy (Fashion-MNIST, cnn-small, cached), and writing results."""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def machine() -> dict[str, Any]:
    """The engine's description of the machine, with the load it carried at the start."""
    from unlearning.machine import describe

    return {**describe(), "load_average": os.getloadavg()}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def service_world(n_pool: int) -> tuple[Any, int]:
    """The deployed model of the service benchmarks, trained once per pool size and cached
    under .lethe/bench-cache: returns the world and how many training images it holds."""
    from unlearning.data.catalog import iter_manifest
    from unlearning.training import Recipe
    from worker.world import build_world

    world = build_world(REPO / ".lethe" / "bench-cache" / f"world-{n_pool}",
                        data_dir=REPO / ".lethe", n_pool=n_pool, n_test=10000,
                        holdout_fraction=0.1, samples_per_subject=5,
                        recipe=Recipe(epochs=20, lr=0.05, weight_decay=5e-4), device="cpu")
    train = sum(1 for row in iter_manifest(world.weights.parent.parent / "datasets" /
                                            world.store) if row["split"] == "train")
    return world, train


def write_results(out: str, result: dict[str, Any],
                  markdown: Callable[[dict[str, Any]], str]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps(result, indent=1))
    Path(out + ".md").write_text(markdown(result))
    print(markdown(result))
