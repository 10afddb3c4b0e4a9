"""Play every fault end to end on the real local stack: nothing lost, nothing billed twice, no limit broken.

``python -m bench.chaos [--docs 210] [--fault-seconds 30] [--only NAME ...]``

Each scenario sends a fresh batch over the three providers (baidu, idp, tuputech) through a
whole local stack (redis-server with AOF, moto behind the signature-checking S3 front, the
three emulators, the receiver, Celery workers), plays its fault while the batch runs, waits
until every document has ended, and counts, with the emulators and the S3 front as referees:

- documents, archived (``result.json``), failed with a reason (``error.json``), lost (neither);
- archived twice: a ``result.json`` the S3 front saw written more than once, or a document
  with both a result and an error;
- extra provider tasks: documents an emulator accepted more than once (by content);
- limit violations: requests an emulator refused for exceeding a documented limit, and
  tuputech tasks in flight beyond 30;
- recovery: from the fault to the last affected document ended (the documents a killed worker
  held; the documents in progress when an outage began).

Redis (for the workers) and S3 (for everyone) sit behind TCP delay lines (``emulators.netem``)
so that latency and refused connections can be played. A table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from bench.rate_limits import gap_profile, rate
from pipeline import jobs, storage
from pipeline.devstack import LocalStack, free_port, local_http, wait_until
from pipeline.batches import list_sources
from pipeline.enqueue import JobHandle, enqueue_listed, enqueue_many
from pipeline.samples import make_batch, make_report_pdf

PROVIDERS = ("baidu", "idp", "tuputech")
SHARE = {"baidu": 0.3, "idp": 0.35, "tuputech": 0.35}
TUPUTECH_LIMIT = 30
INBOX = "chaos-inbox"
SETTINGS = {
    "DOCPIPE_POLL_FIRST_DELAY": "1",
    "DOCPIPE_POLL_BASE_DELAY": "0.5",
    "DOCPIPE_POLL_MAX_DELAY": "3",
    "DOCPIPE_HTTP_TIMEOUT": "5",
    "DOCPIPE_TUPUTECH_CALLBACK_WINDOW": "15",
    "DOCPIPE_TUPUTECH_EXPECTED_PROCESSING": "10",
    "DOCPIPE_IDP_LOGIN_COOLDOWN": "3",
    "DOCPIPE_RECONCILE_EVERY": "2",
}
EMULATOR = {"processing_min": 1.0, "processing_max": 4.0}


@dataclass
class Row:
    name: str
    documents: int = 0
    archived: int = 0
    failed: int = 0
    lost: int = 0
    archived_twice: int = 0
    extra_provider_tasks: int = 0
    limit_violations: int = 0
    recovery_s: float | None = None
    faults_played: int = 0  # a fault that found nothing to hit (no job at that stage) is not played
    seconds: float = 0.0
    failures: dict[str, int] = field(default_factory=dict)  # reason code -> documents
    notes: str = ""

    def as_json(self) -> dict[str, Any]:
        keys = ("name", "documents", "archived", "failed", "lost", "archived_twice", "extra_provider_tasks", "limit_violations", "recovery_s", "faults_played")
        return {k: getattr(self, k) for k in keys} | {"seconds": self.seconds, "failures": self.failures, "notes": self.notes}


class Chaos:
    """The stack every scenario runs on, and what a fault needs to reach it."""

    def __init__(
        self,
        workdir: Path,
        workers: int,
        *,
        emulator_config: dict[str, dict[str, Any]] | None = None,
        settings: dict[str, str] | None = None,
        tuputech_limit: int = TUPUTECH_LIMIT,
        concurrency: int = 6,
    ) -> None:
        self.workdir = workdir
        config = emulator_config or {p: dict(EMULATOR) for p in PROVIDERS}
        self.stack = LocalStack(workdir / "stack", emulator_config=config, settings={**SETTINGS, **(settings or {})})
        self.workers = workers
        self.tuputech_limit = tuputech_limit
        self.concurrency = concurrency
        self.spawned = 0

    # -- the stack -------------------------------------------------------------------------------

    def start(self) -> None:
        stack = self.stack
        stack.start_redis()
        stack.start_s3()
        s3_port = stack.start_netem("s3", stack.ports["s3"])
        stack.settings["DOCPIPE_S3_ENDPOINT_URL"] = f"http://127.0.0.1:{s3_port}"
        self.redis_via = stack.start_netem("redis", stack.ports["redis"])
        stack.start_emulators(PROVIDERS)
        self.defaults = {p: self.emulator(p, "/_emulator/config") for p in PROVIDERS}
        stack.activate()
        storage.ensure_buckets(also=[INBOX])
        stack.start_callbacks()
        names = [self.start_worker(wait=False) for _ in range(self.workers)]
        stack.wait_workers(names)

    def start_worker(self, wait: bool = True) -> str:
        self.spawned += 1
        name = f"chaos{self.spawned}"
        env = {"DOCPIPE_REDIS_URL": f"redis://127.0.0.1:{self.redis_via}/0"}
        self.stack.start_worker(name, [f"docpipe.{p}" for p in PROVIDERS], concurrency=self.concurrency, env=env, wait=wait)
        return name

    @property
    def redis(self) -> redis.Redis:
        """Redis as the bench sees it: direct, not through the workers' delay line."""
        return redis.Redis.from_url(self.stack.env["DOCPIPE_REDIS_URL"], socket_timeout=10)

    def emulator(self, provider: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        url = f"{self.stack.emulator_url(provider)}{path}"
        return (local_http().post(url, json=body) if body is not None else local_http().get(url)).json()

    def reset_emulators(self) -> None:
        """Each emulator back to its configuration at start (faults off) with fresh statistics."""
        for provider in PROVIDERS:
            self.emulator(provider, "/_emulator/config", self.defaults[provider])
            local_http().post(f"{self.stack.emulator_url(provider)}/_emulator/reset")
        local_http().delete(f"http://127.0.0.1:{self.stack.ports['s3']}/_proxy/writes")

    # -- a batch ---------------------------------------------------------------------------------

    def documents(self, name: str, count: int) -> dict[str, list[Path]]:
        """``count`` new documents over the three providers, each of a kind its provider reads."""
        made = {}
        for provider in PROVIDERS:
            n = max(1, round(count * SHARE[provider]))
            where = self.workdir / "docs" / name / provider
            where.mkdir(parents=True, exist_ok=True)
            if provider == "tuputech":
                made[provider] = [make_report_pdf(where / f"r{i:05d}.pdf", i, flagged_page=1 if i % 3 else None).path for i in range(n)]
            else:
                made[provider] = [s.path for s in make_batch(where, n)]
        return made

    def send(self, name: str, count: int, handles: list[JobHandle] | None = None) -> list[JobHandle]:
        """Enqueue the scenario's documents; their handles, appended to ``handles`` as they are sent
        (a fault watching them from another thread sees each one as soon as it exists)."""
        handles = [] if handles is None else handles
        for provider, sources in self.documents(name, count).items():
            # Half as local files, one by one; half from an S3 listing, a chunk and a dispatch message at a time.
            listed, local = sources[: len(sources) // 2], sources[len(sources) // 2 :]
            prefix = f"chaos-{name}/{provider}/"
            for path in listed:
                storage.upload_file(path, INBOX, prefix + path.name)
            sent_all = list(enqueue_many(local, provider)) + list(enqueue_listed(list_sources(f"s3://{INBOX}/{prefix}"), provider))
            for sent in sent_all:
                if sent.handle is None:
                    raise SystemExit(f"{name}: {sent.source} not sent: {sent.error}")
                handles.append(sent.handle)
        return handles

    def states(self, handles: list[JobHandle]) -> dict[str, dict[str, str]]:
        """Each job's record, read again and again while Redis restarts or refuses: the bench waits too."""
        for attempt in range(600):
            try:
                return self._states(handles)
            except redis.RedisError:
                time.sleep(0.5)
        return self._states(handles)

    def _states(self, handles: list[JobHandle]) -> dict[str, dict[str, str]]:
        pipe = self.redis.pipeline(transaction=False)
        for h in handles:
            pipe.hmget(jobs.key(h.job_id), "state", "updated_at", "step", "holder", "running")
        out = {}
        for h, values in zip(handles, pipe.execute()):
            state, updated, step, holder, running = (v.decode() if v else "" for v in values)
            out[h.job_id] = {"state": state, "updated_at": updated, "step": step, "holder": holder, "running": running}
        return out

    def wait_ended(self, handles: list[JobHandle], timeout: float) -> dict[str, dict[str, str]]:
        deadline = time.monotonic() + timeout
        while True:
            states = self.states(handles)
            if all(s["state"] in jobs.FINAL_STATES for s in states.values()) or time.monotonic() > deadline:
                return states
            workers = [p for name, p in self.stack.procs.items() if name.startswith("worker-")]
            if workers and not any(p.alive() for p in workers):  # a crash of every worker is a finding, not a wait
                raise RuntimeError("every worker exited:\n" + "\n".join(f"{p.name}: {p.tail(5)}" for p in workers))
            time.sleep(0.5)

    # -- the referees ----------------------------------------------------------------------------

    def measure(self, row: Row, handles: list[JobHandle], states: dict[str, dict[str, str]]) -> None:
        writes = local_http().get(f"http://127.0.0.1:{self.stack.ports['s3']}/_proxy/writes", params={"suffix": "result.json"}).json()["keys"]
        row.documents = len(handles)
        archives = archive_contents({h.provider for h in handles})
        for h in handles:
            names = archives.get((h.provider, h.job_id), set())
            key = storage.archive_prefix(h.provider, h.job_id) + "result.json"
            if "result.json" in names:
                row.archived += 1
            elif "error.json" in names:
                row.failed += 1
                code = storage.get_json(storage.archive_prefix(h.provider, h.job_id) + "error.json")["code"]
                row.failures[code] = row.failures.get(code, 0) + 1
            else:
                row.lost += 1
            if writes.get(key, 0) > 1 or {"result.json", "error.json"} <= names:
                row.archived_twice += 1
        for provider in PROVIDERS:
            stats = self.emulator(provider, "/_emulator/stats")
            row.extra_provider_tasks += int(stats.get("documents", {}).get("repeated", 0))
            for endpoint, figures in stats["endpoints"].items():
                if int(figures.get("limit_violations", 0)):
                    row.limit_violations += int(figures["limit_violations"])
                    row.notes += f" {provider} {endpoint}: {figures['limit_violations']} over its limit;"
                    for seen in figures.get("violations", []):
                        print(f"  {row.name}: {provider} {endpoint} over its limit: {json.dumps(seen)}", file=sys.stderr, flush=True)
            if provider == "baidu" and float(stats.get("loop_lag_max_ms", 0)) > 10:
                row.notes += f" baidu emulator's loop lagged up to {stats['loop_lag_max_ms']:.0f} ms (its stamps may trail arrivals by that);"
            if provider == "tuputech" and int(stats.get("max_in_flight_seen", 0)) > self.tuputech_limit:
                row.limit_violations += int(stats["max_in_flight_seen"]) - self.tuputech_limit
                row.notes += f" tuputech: {stats['max_in_flight_seen']} in flight;"


def archive_contents(providers: set[str]) -> dict[tuple[str, str], set[str]]:
    """The names in every job's archive, (provider, job id) -> names, from one flat listing per
    provider: a listing per document costs a request each, and moto's each scans every key of the
    bucket (bench.scale's 10,000 documents took over twenty minutes to check that way)."""
    contents: dict[tuple[str, str], set[str]] = {}
    pages = storage.s3_client().get_paginator("list_objects_v2")
    for provider in providers:
        for page in pages.paginate(Bucket=storage.get_settings().results_bucket, Prefix=f"{provider}/"):
            for entry in page.get("Contents", []):
                parts = entry["Key"].split("/", 2)
                if len(parts) == 3:
                    contents.setdefault((provider, parts[1]), set()).add(parts[2])
    return contents


# --- faults: each runs in a thread beside the batch and returns, per fault it played, its time
# --- and the jobs it affected

Fault = Callable[[Chaos, list[JobHandle], float], list[tuple[float, set[str]]]]


def _tuputech(handles: list[JobHandle]) -> set[str]:
    return {h.job_id for h in handles if h.provider == "tuputech"}


def _in_progress(chaos: Chaos, handles: list[JobHandle]) -> set[str]:
    return {job for job, s in chaos.states(handles).items() if s["state"] not in jobs.FINAL_STATES and s["state"] != "queued"}


def kill_during(stage: str, kills: int = 3) -> Fault:
    """SIGKILL a worker while it holds a job at ``stage`` (running it, or, for await, holding its
    poll in memory), ``kills`` times, starting a replacement each time. Affected: what it held."""

    def fault(chaos: Chaos, handles: list[JobHandle], seconds: float) -> list[tuple[float, set[str]]]:
        played: list[tuple[float, set[str]]] = []
        for _ in range(kills):
            victim = _holder_at(chaos, handles, stage, timeout=120)
            if victim is None:
                break
            holder, pid = victim
            ours = {h.job_id for h in handles}
            held = {m.decode().split(" ")[0] for m in chaos.redis.smembers(jobs.held_key(holder))}
            held |= {job for job, s in chaos.states(handles).items() if s["holder"] == holder}
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # it died meanwhile (killed a moment ago, not yet reaped): pick again
                continue
            played.append((time.time(), held & ours))
            chaos.start_worker(wait=False)
        return played

    return fault


def _holder_at(chaos: Chaos, handles: list[JobHandle], stage: str, timeout: float) -> tuple[str, int] | None:
    alive = {proc.popen.pid for name, proc in chaos.stack.procs.items() if name.startswith("worker-") and proc.alive()}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for s in chaos.states(handles).values():
            holder = s["holder"]
            # The stage a held job runs: its message's step, or a later one run inline (``running``).
            if holder and (s["running"] or s["step"]) == stage and int(holder.rsplit(":", 1)[1]) in alive and s["state"] not in jobs.FINAL_STATES:
                return holder, int(holder.rsplit(":", 1)[1])
        if stage == "await":  # polls wait in a worker's memory for their countdown: its held set names them
            steps = {job: s["step"] for job, s in chaos.states(handles).items()}
            for pid in alive:
                for member in chaos.redis.smembers(jobs.held_key(f"{os.uname().nodename}:{pid}")):
                    if steps.get(member.decode().split(" ")[0]) == "await":
                        return f"{os.uname().nodename}:{pid}", pid
        time.sleep(0.01)
    return None


def after(seconds: float, action: Callable[[Chaos], None], undo: Callable[[Chaos], None] | None = None, hold: float = 0.0) -> Fault:
    """Play ``action`` ``seconds`` into the batch; ``undo`` it ``hold`` seconds later (the fault's length)."""

    def fault(chaos: Chaos, handles: list[JobHandle], length: float) -> list[tuple[float, set[str]]]:
        time.sleep(seconds)
        affected = _in_progress(chaos, handles)
        at = time.time()
        try:
            action(chaos)
            if undo is not None:
                time.sleep(hold or length)
        finally:
            if undo is not None:
                undo(chaos)
        return [(at, affected)]

    return fault


def _restart_redis(chaos: Chaos) -> None:
    chaos.stack.restart_redis(hard=True)


def _oom(chaos: Chaos) -> None:
    chaos.redis.config_set("maxmemory-policy", "noeviction")
    chaos.redis.config_set("maxmemory", "1")


def _oom_over(chaos: Chaos) -> None:
    chaos.redis.config_set("maxmemory", "0")


def _readonly(chaos: Chaos) -> None:
    chaos.redis.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))  # a master nobody runs: writes answer READONLY


def _readonly_over(chaos: Chaos) -> None:
    chaos.redis.execute_command("REPLICAOF", "NO", "ONE")


def _s3_down(length: float) -> Fault:
    """Half the time 503 SlowDown from the S3 front, then refused connections."""

    def fault(chaos: Chaos, handles: list[JobHandle], _: float) -> list[tuple[float, set[str]]]:
        time.sleep(3)
        affected, at = _in_progress(chaos, handles), time.time()
        chaos.stack.s3_faults("slowdown", length / 2)
        time.sleep(length / 2)
        chaos.stack.netem("s3", "refuse", seconds=length / 2)
        time.sleep(length / 2)
        return [(at, affected)]

    return fault


def _receiver_down(length: float) -> Fault:
    def fault(chaos: Chaos, handles: list[JobHandle], _: float) -> list[tuple[float, set[str]]]:
        time.sleep(3)
        affected, at = _in_progress(chaos, handles), time.time()
        chaos.stack.procs.pop("callbacks").stop()
        time.sleep(length)
        chaos.stack.start_callbacks()
        return [(at, {j for j in affected if j in _tuputech(handles)})]

    return fault


def _emulators(config: dict[str, dict[str, Any]]) -> Fault:
    def fault(chaos: Chaos, handles: list[JobHandle], _: float) -> list[tuple[float, set[str]]]:
        for provider, changes in config.items():
            chaos.emulator(provider, "/_emulator/config", changes)
        return [(time.time(), {h.job_id for h in handles if h.provider in config})]

    return fault


def _lost_callbacks(count: int) -> Fault:
    """Tuputech drops its callbacks until ``count`` were dropped (a few more may go in the same
    instant: the emulator's ``callbacks_dropped`` says how many); then callbacks come again."""

    def fault(chaos: Chaos, handles: list[JobHandle], _: float) -> list[tuple[float, set[str]]]:
        at = time.time()
        chaos.emulator("tuputech", "/_emulator/config", {"callback_drop_rate": 1.0})
        wait_until(lambda: chaos.emulator("tuputech", "/_emulator/stats").get("callbacks_dropped", 0) >= count, 300, "lost callbacks")
        chaos.emulator("tuputech", "/_emulator/config", {"callback_drop_rate": 0.0})
        return [(at, _tuputech(handles))]

    return fault


def _latency(rtt_ms: float) -> Fault:
    def fault(chaos: Chaos, handles: list[JobHandle], _: float) -> list[tuple[float, set[str]]]:
        chaos.stack.netem("redis", "delay", ms=rtt_ms / 2)
        return []

    return fault


def scenarios(length: float) -> dict[str, Fault]:
    provider_faults = {
        p: {"faults": {"http_5xx_rate": 0.08, "internal_error_rate": 0.04, "slow_rate": 0.02, "slow_seconds": 8, "drop_rate": 0.03,
                       "spurious_limit_rate": 0.03, "token_expiry_every": 20}}
        for p in PROVIDERS
    }
    found: dict[str, Fault] = {f"kill_at_{stage}": kill_during(stage) for stage in ("stage", "submit", "await", "fetch", "archive")}
    found |= {
        "redis_restart": after(5, _restart_redis),
        "redis_oom": after(5, _oom, _oom_over, hold=length),
        "redis_readonly": after(5, _readonly, _readonly_over, hold=length),
        "s3_outage": _s3_down(length),
        "redis_2ms": _latency(2),
        "redis_10ms": _latency(10),
        "redis_20ms": _latency(20),
        "provider_faults": _emulators(provider_faults),
        "receiver_down": _receiver_down(2 * length),
        "lost_callbacks": _lost_callbacks(30),
        "callbacks_twice_and_late": _emulators({"tuputech": {"callback_duplicate_rate": 0.5, "callback_delay": 3.0}}),
    }
    return found


def run(chaos: Chaos, name: str, fault: Fault, docs: int, length: float, timeout: float) -> Row:
    chaos.reset_emulators()
    chaos.stack.netem("redis", "delay", ms=0)
    row = Row(name)
    started = time.time()
    handles: list[JobHandle] = []
    outcome: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: outcome.update(result=fault(chaos, handles, length)), daemon=True)
    # A kill looks for its victim while the documents are still being sent: a step that runs
    # the stages due at once after it leaves each document in ``stage`` only briefly, and under
    # a busy CPU every document of a small batch had been staged before the send returned.
    watches_the_send = name.startswith("kill")
    if watches_the_send:
        worker.start()
    chaos.send(name, docs, handles)
    if not watches_the_send:
        worker.start()
    try:
        states = chaos.wait_ended(handles, timeout)
    finally:
        worker.join(timeout)  # the fault is undone before anything else runs
    row.seconds = round(time.time() - started, 1)
    chaos.measure(row, handles, states)
    recoveries = []
    row.faults_played = len(outcome.get("result", []))
    for at, affected in outcome.get("result", []):
        if not affected:
            continue
        ended = [float(states[j]["updated_at"]) for j in affected if states[j]["state"] in jobs.FINAL_STATES]
        unfinished = len(ended) < len(affected)
        recoveries.append((time.time() if unfinished else max(ended)) - at)
    if recoveries:
        row.recovery_s = round(max(recoveries), 1)
    if name.startswith("redis_") and name.endswith("ms"):
        row.notes += _baidu_share(chaos)
    return row


def _baidu_share(chaos: Chaos) -> str:
    """The baidu submit rate over the busy span, as a share of the documented 2/s."""
    arrivals = sorted(chaos.emulator("baidu", "/_emulator/stats?arrivals=1")["accepted_at"].get("submit", []))
    if len(arrivals) < 2:
        return ""
    gaps = gap_profile(arrivals, 0.5)
    return (f"baidu submits at {rate(arrivals) / 2.0:.3f} of 2/s "
            f"(median gap {gaps['median_gap_s']:.3f}s, {gaps['share_in_holes']:.3f} of the span in holes)")


def print_row(row: Row) -> None:
    recovery = "-" if row.recovery_s is None else f"{row.recovery_s:.1f}"
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(row.failures.items()))
    print(
        f"{row.name:<26} {row.documents:>5} {row.archived:>8} {row.failed:>6} {row.lost:>4} {row.archived_twice:>8} "
        f"{row.extra_provider_tasks:>11} {row.limit_violations:>10} {recovery:>10} {row.seconds:>7.1f}  {reasons} {row.notes}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=210, help="documents per scenario, over the three providers")
    parser.add_argument("--fault-seconds", type=float, default=30.0, help="how long outages last")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900.0, help="longest wait for a batch to end")
    parser.add_argument("--only", nargs="*", default=None, help="scenario names to run")
    parser.add_argument("--keep", type=Path, default=None, help="run in this directory and keep it (logs of every process)")
    args = parser.parse_args(argv)
    chosen = {k: v for k, v in scenarios(args.fault_seconds).items() if not args.only or k in args.only}
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="docpipe-chaos-") as tmp:
        workdir = Path(tmp) if args.keep is None else args.keep
        workdir.mkdir(parents=True, exist_ok=True)
        chaos = Chaos(workdir, args.workers)
        try:
            chaos.start()
            print(f"{'scenario':<26} {'docs':>5} {'archived':>8} {'failed':>6} {'lost':>4} {'twice':>8} {'extra tasks':>11} "
                  f"{'violations':>10} {'recovery s':>10} {'seconds':>7}  failures", flush=True)
            for name, fault in chosen.items():
                row = run(chaos, name, fault, args.docs, args.fault_seconds, args.timeout)
                rows.append(row)
                print_row(row)
        finally:
            chaos.stack.stop()
    ok = all(r.lost == 0 and r.archived_twice == 0 and r.extra_provider_tasks == 0 and r.limit_violations == 0 for r in rows)
    print(json.dumps({"benchmark": "chaos", "all_invariants_held": ok, "scenarios": [r.as_json() for r in rows]}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
