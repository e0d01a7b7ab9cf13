"""``make demo``: the operator and real engines on the local cluster, under load, for DEMO_SECONDS.

1. starts the local cluster (emulated API, controllers, kubelet) and ``kvcache-operator run``;
2. applies ``crds/samples/local-demo.yaml`` (CPU engines, autoscaling and tuning Auto) and waits
   until it is Ready;
3. replays the packaged conversation trace through ``KVCacheClient`` while a live dashboard shows
   replicas, hit rate, memory pressure and the operator's decisions;
4. writes ``demo-report.png`` (replicas, measured and predicted hit rate and memory pressure over
   time, decisions marked)
   and prints a summary. Ctrl-C at any point stops everything; no process is left behind.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from e2e import scenarios
from e2e.localcluster.cluster import LocalCluster
from e2e.localcluster.driver import LocalDriver
from e2e.localcluster.load import TraceLoad

SAMPLE = scenarios.SAMPLE
NAME = "demo"


@dataclass
class Timeline:
    """What the dashboard saw, once a second (t in seconds since the load started)."""

    t: list[float] = field(default_factory=list)
    replicas: list[int] = field(default_factory=list)
    ready: list[int] = field(default_factory=list)
    hit_rate: list[float | None] = field(default_factory=list)  # the operator's (status.hitRate)
    client_hit_rate: list[float | None] = field(default_factory=list)  # the load generator's, per second
    pressure: list[float | None] = field(default_factory=list)
    predicted: list[float | None] = field(default_factory=list)  # the curve's (status.predictedHitRate)
    ceiling: list[float | None] = field(default_factory=list)  # status.predictedCeiling
    decisions: list[tuple[float, dict[str, Any]]] = field(default_factory=list)


def observe(
    driver: LocalDriver, load: TraceLoad, timeline: Timeline, t0: float, last: dict[str, float]
) -> dict[str, Any]:
    kvc = driver.get("KVCache", NAME) or {}
    status = kvc.get("status") or {}
    sts = driver.get("StatefulSet", NAME) or {}
    now = load.stats.snapshot()
    d_req = now["requested_tokens"] - last.get("requested_tokens", 0)
    d_hit = now["hit_tokens"] - last.get("hit_tokens", 0)
    last.update(now)
    t = time.monotonic() - t0
    timeline.t.append(t)
    timeline.replicas.append(int((sts.get("spec") or {}).get("replicas") or 0))
    timeline.ready.append(int(status.get("readyReplicas") or 0))
    timeline.hit_rate.append(status.get("hitRate"))
    timeline.client_hit_rate.append(d_hit / d_req if d_req else None)
    timeline.pressure.append(status.get("memoryPressure"))
    timeline.predicted.append(status.get("predictedHitRate"))
    timeline.ceiling.append(status.get("predictedCeiling"))
    seen = {(d["time"], d["action"]) for _, d in timeline.decisions}
    for decision in status.get("decisions") or []:
        if (decision.get("time"), decision.get("action")) not in seen:
            timeline.decisions.append((t, decision))
    return status


def _fmt(value: float | None, pct: bool = True) -> str:
    if value is None:
        return "-"
    return f"{value:.1%}" if pct else f"{value:.2f}"


def dashboard(timeline: Timeline, status: dict[str, Any], load: TraceLoad, total_s: float) -> Group:
    elapsed = timeline.t[-1] if timeline.t else 0.0
    stats = load.stats.snapshot()
    table = Table(title=f"KVCache '{NAME}' — {elapsed:4.0f}s / {total_s:.0f}s", expand=True)
    for column in (
        "replicas (desired/ready)",
        "hit rate (operator)",
        "predicted (curve)",
        "ceiling",
        "recommended blocks",
        "hit rate (client, 1s)",
        "memory pressure",
        "codec",
        "requests sent",
        "overall client hit rate",
    ):
        table.add_column(column, justify="right")
    table.add_row(
        f"{timeline.replicas[-1] if timeline.replicas else 0}/{timeline.ready[-1] if timeline.ready else 0}",
        _fmt(status.get("hitRate")),
        _fmt(status.get("predictedHitRate")),
        _fmt(status.get("predictedCeiling")),
        f"{status['recommendedCapacity']:,}" if status.get("recommendedCapacity") is not None else "-",
        _fmt(timeline.client_hit_rate[-1] if timeline.client_hit_rate else None),
        _fmt(status.get("memoryPressure")),
        str(status.get("codec", "-")),
        f"{stats['requests']:.0f}",
        _fmt(stats["hit_rate"]),
    )
    decisions = Table(title="operator decisions", expand=True)
    for column in ("at", "kind", "action", "reason"):
        decisions.add_column(column, overflow="fold")
    for t, d in timeline.decisions[-6:]:
        decisions.add_row(f"{t:.0f}s", str(d.get("kind")), str(d.get("action")), str(d.get("reason")))
    if not timeline.decisions:
        decisions.add_row("-", "-", "none yet", "waiting for the stabilization window")
    return Group(table, decisions)


def write_report(timeline: Timeline, path: Path) -> None:
    """Three panels over time (replicas, hit rate, memory pressure); decisions as labelled lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
    axes[0].step(timeline.t, timeline.replicas, where="post", label="desired (StatefulSet)")
    axes[0].step(timeline.t, timeline.ready, where="post", label="ready", linestyle="--")
    axes[0].set_ylabel("engine replicas")
    axes[0].yaxis.get_major_locator().set_params(integer=True)
    _series(axes[1], timeline.t, timeline.hit_rate, "status.hitRate (operator)")
    _series(axes[1], timeline.t, timeline.client_hit_rate, "client, per second", alpha=0.4)
    _series(axes[1], timeline.t, timeline.predicted, "status.predictedHitRate (curve)")
    _series(axes[1], timeline.t, timeline.ceiling, "status.predictedCeiling", alpha=0.6)
    axes[1].set_ylabel("hit rate")
    _series(axes[2], timeline.t, timeline.pressure, "status.memoryPressure")
    axes[2].set_ylabel("memory pressure")
    axes[2].set_xlabel("seconds since the load started")
    notes = []
    for i, (t, decision) in enumerate(timeline.decisions, start=1):
        color = "tab:red" if decision.get("kind") == "Scale" else "tab:purple"
        for ax in axes:
            ax.axvline(t, color=color, linestyle=":", linewidth=1.5)
        axes[0].text(
            t, 0.97, f" {i}", transform=axes[0].get_xaxis_transform(), va="top", fontsize=9, color=color
        )
        notes.append(f"{i}. {t:.0f}s {decision.get('kind')}: {decision.get('action')}")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle("kvcache-operator on the local cluster: trace replay under load")
    fig.text(0.01, 0.01, "\n".join(notes) or "no decision", fontsize=8, va="bottom", family="monospace")
    fig.tight_layout(rect=(0, 0.03 + 0.02 * len(notes), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _series(ax: Any, t: list[float], values: list[float | None], label: str, alpha: float = 1.0) -> None:
    points = [(x, v) for x, v in zip(t, values, strict=True) if v is not None]
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], label=label, alpha=alpha)
    ax.set_ylim(0, 1.05)


def summary(timeline: Timeline, load: TraceLoad, report: Path, console: Console) -> None:
    stats = load.stats.snapshot()
    console.print(f"\n[bold]demo summary[/bold] ({timeline.t[-1] if timeline.t else 0:.0f}s of load)")
    console.print(f"  requests replayed: {stats['requests']:.0f}, client hit rate {stats['hit_rate']:.1%}")
    if timeline.replicas:
        console.print(
            f"  replicas: {timeline.replicas[0]} -> {timeline.replicas[-1]} "
            f"(ready at the end: {timeline.ready[-1]})"
        )
    predicted = next((p for p in reversed(timeline.predicted) if p is not None), None)
    measured = next((h for h in reversed(timeline.hit_rate) if h is not None), None)
    ceiling = next((c for c in reversed(timeline.ceiling) if c is not None), None)
    console.print(
        f"  hit rate at the end: measured {_fmt(measured)}, predicted by the engines' curve "
        f"{_fmt(predicted)} (ceiling {_fmt(ceiling)})"
    )
    console.print(f"  operator decisions: {len(timeline.decisions)}")
    for t, d in timeline.decisions:
        console.print(f"    {t:5.0f}s {d.get('kind')}: {d.get('action')} — {d.get('reason')}")
    console.print(f"  report: {report.resolve()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--seconds",
        type=float,
        default=float(os.environ.get("DEMO_SECONDS", "60")),
        help="seconds of load (default: $DEMO_SECONDS or 60)",
    )
    parser.add_argument("--report", type=Path, default=Path("demo-report.png"), help="report image path")
    parser.add_argument("--rate", type=float, default=40.0, help="trace requests per second")
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error(f"--seconds/DEMO_SECONDS must be > 0, got {args.seconds}")
    console = Console()
    # The client logs every refused connection (a pod stopping during a scale event); the
    # dashboard shows the load's effect instead, so keep its warnings off the live display.
    logging.getLogger("kvcache_engine").setLevel(logging.ERROR)
    timeline = Timeline()
    load: TraceLoad | None = None
    try:
        with LocalCluster(shutdown_grace_s=5.0) as cluster:
            driver = LocalDriver(cluster)
            console.print(
                f"local cluster up (API {cluster.server_url}, state {cluster.state_dir}); "
                f"applying {SAMPLE.relative_to(scenarios.REPO)}"
            )
            manifest = scenarios.kvcache_manifest(NAME, driver)
            driver.apply(manifest)
            with console.status("waiting for the KVCache to be Ready ..."):
                scenarios.wait_ready(driver, NAME, int(manifest["spec"]["replicas"]), timeout_s=180)
            load = TraceLoad(
                lambda: scenarios.ready_endpoints(driver, NAME),
                lambda: scenarios.token(driver, NAME),
                scenarios.engine_config(manifest),
                rate_rps=args.rate,
            ).start()
            t0, last = time.monotonic(), dict[str, float]()
            try:
                status = observe(driver, load, timeline, t0, last)
                with Live(
                    Panel(dashboard(timeline, status, load, args.seconds)),
                    console=console,
                    refresh_per_second=2,
                ) as live:
                    while time.monotonic() - t0 < args.seconds:
                        time.sleep(1.0)
                        status = observe(driver, load, timeline, t0, last)
                        live.update(Panel(dashboard(timeline, status, load, args.seconds)))
            finally:
                # Stop the load while the engines still run (on Ctrl-C too), then the cluster.
                load.stop(check=False)
            console.print("stopping the cluster ...")
    except KeyboardInterrupt:
        console.print("\ninterrupted: the load, the operator and every engine were stopped")
    if timeline.t and load is not None:
        write_report(timeline, args.report)
        summary(timeline, load, args.report, console)
    return 0 if timeline.decisions or not timeline.t else 1


if __name__ == "__main__":
    sys.exit(main())
