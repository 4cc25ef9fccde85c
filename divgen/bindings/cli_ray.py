"""The `--ray` options of `divgen synth`: the job's groups sharded over Ray actors
(engine/synth/ray_shards.py). Registered by cli_synth; Ray is an optional extra (divgen[ray])."""
from __future__ import annotations

import sys


def add_arguments(p) -> None:
    g = p.add_argument_group("Ray scale-out (pip install 'divgen[ray]')")
    g.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="shard the job over Ray actors, one engine each: 'local' (the default when the flag "
                        "has no value) starts a local cluster; HOST:PORT or ray://HOST:PORT joins a running one")
    g.add_argument("--ray-workers", type=int, default=None,
                   help="actors = shards (default 2, or the count of an interrupted run's shards)")
    g.add_argument("--ray-cpus-per-worker", type=int, default=1, help="CPUs (torch threads) per actor (default 1)")
    g.add_argument("--ray-gpus-per-worker", type=float, default=0, help="GPUs per actor (default 0; 1 on GPU nodes)")


def run(task, args, batch_rows: int) -> int:
    from divgen.engine.synth.ray_shards import run_synth_ray

    report = run_synth_ray(task, args.out, address=args.ray, workers=args.ray_workers,
                           cpus_per_worker=args.ray_cpus_per_worker, gpus_per_worker=args.ray_gpus_per_worker,
                           batch_rows=batch_rows, progress=args.progress)
    if report.new_records:
        counts = ", ".join(f"{k} {v}" for k, v in report.counts.items())
        resumed = [i for i, n in report.attempts.items() if n > 1]
        print(f"{report.out}: {report.workers} Ray workers wrote {report.new_records} examples in "
              f"{report.wall_time_s:.1f}s ({report.examples_per_s:.2f} examples/s, {task.method})"
              + (f"; shards {resumed} resumed by new workers" if resumed else "")
              + f"; file now holds {counts}", file=sys.stderr)
    return 0
