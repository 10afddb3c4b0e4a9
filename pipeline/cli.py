"""The ``docpipe`` command: ingest and submit batches, watch, retry and cancel them, run the local stack.

Every command takes ``--json`` (one JSON document on stdout; ``jobs`` writes one per line)
and exits 0 when everything it covers succeeded, 1 when a document failed or was refused
(each named with its reason), 2 for a usage or configuration error (one message), and 3
when ``--wait`` timed out.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.console import Console

from pipeline.providers import provider_names

OK, FAILED, USAGE, TIMEOUT = 0, 1, 2, 3

# No locals in tracebacks: they would print settings and keys.
app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False)
# Piped output is not wrapped at 80 columns: scripts get whole lines (and --json for parsing).
console = Console(width=None if sys.stdout.isatty() else 250)
errors = Console(stderr=True, width=None if sys.stderr.isatty() else 250)

ProviderOpt = Annotated[str, typer.Option("--provider", "-p", help=f"one of: {', '.join(provider_names())}")]
OptionOpt = Annotated[Optional[list[str]], typer.Option("--option", "-o", help="provider option KEY=VALUE (VALUE may be JSON)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="one JSON document on stdout, for scripts")]
BatchOpt = Annotated[Optional[str], typer.Option("--batch", "-b", help="batch name (default: generated, and printed)")]
WaitOpt = Annotated[bool, typer.Option("--wait", help="watch the batch to its end with a progress bar")]
TimeoutOpt = Annotated[float, typer.Option(help="seconds --wait waits before exit code 3")]

F = TypeVar("F", bound=Callable[..., Any])


def handled(fn: F) -> F:
    """One clear line and the documented exit code for what is not a document's fault."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from pipeline.batches import BatchError
        from pipeline.preflight import ConfigError

        try:
            return fn(*args, **kwargs)
        except (ConfigError, BatchError, FileNotFoundError) as exc:
            errors.print(f"[red]docpipe: {exc}[/]", markup=True, highlight=False)
            raise typer.Exit(USAGE) from None
        except TimeoutError as exc:
            errors.print(f"[yellow]docpipe: timed out: {exc}[/]", highlight=False)
            raise typer.Exit(TIMEOUT) from None

    return wrapper  # type: ignore[return-value]


def _emit(data: Any) -> None:
    sys.stdout.write(json.dumps(data, default=str) + "\n")
    sys.stdout.flush()


def _options(pairs: list[str] | None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--option")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _check_provider(provider: str) -> None:
    if provider not in provider_names():
        raise typer.BadParameter(f"unknown provider {provider!r}; known: {', '.join(provider_names())}", param_hint="--provider")


def _source_bucket(location: str) -> str | None:
    from pipeline import storage

    return storage.parse_s3_uri(location)[0] if location.startswith("s3://") else None


def _fill(name: str, as_json: bool, fill: Callable[[Callable[[Any], None]], Any]):
    """Run ``fill`` (given the per-document callback) with a live status, naming refusals as they happen."""
    shown = 0

    def each(outcome) -> None:
        nonlocal shown
        if outcome.handle is None and not as_json and shown < 50:
            errors.print(f"[red]refused {outcome.source}: {outcome.error}[/]", highlight=False)
            shown += 1

    if as_json:
        return fill(each)
    with console.status(f"batch {name}: enqueueing..."):
        return fill(each)


def _finish(name: str, filled, wait: bool, timeout: float, as_json: bool) -> None:
    from pipeline import batches, progress
    from pipeline.runtime import get_runtime

    client = get_runtime().redis
    if wait and not as_json:
        status = progress.watch([name], timeout=timeout, console=console)[name]
    elif wait:
        status = batches.Batch(name).wait(timeout=timeout)
    else:
        status = batches.status(client, name)
    if as_json:
        out = status.as_dict()
        out.update(enqueued=filled.enqueued, refused_sources=batches.refused_sources(client, name))
        if wait:
            out["failed_jobs"] = [m.as_dict() for m in batches.members(client, name, state="failed")]
        _emit(out)
    else:
        if wait:
            # Once it has run, the batch knows what its stage steps found archived: a document
            # enqueued from a listing is looked up there, not here, and was not sent either.
            console.print(
                f"batch {name}: {status.total - status.skipped} processed, {status.skipped} already archived (not sent again), "
                f"{status.refused} refused; {progress.describe(status)}"
            )
        else:
            console.print(
                f"batch {name}: {filled.enqueued} enqueued, {filled.skipped} already archived, {filled.refused} refused"
                f"; follow it with `docpipe status {name} --wait`"
            )
        if wait:
            _print_failures(name, status)
    raise typer.Exit(_exit_code(status, waited=wait))


def _exit_code(status, *, waited: bool) -> int:
    if status.refused or status.failed or status.counts.get("cancelled", 0):
        return FAILED
    return OK if (status.complete or not waited) else TIMEOUT


def _print_failures(name: str, status) -> None:
    from pipeline import batches
    from pipeline.runtime import get_runtime

    if status.reasons:
        console.print("failures by reason: " + ", ".join(f"{reason} x{count}" for reason, count in status.reasons.items()))
    client = get_runtime().redis
    for n, member in enumerate(batches.members(client, name, state="failed")):
        if n == 20:
            console.print(f"... and more: `docpipe jobs {name} --state failed`")
            break
        console.print(f"[red]failed[/] {member.source}: {member.error}", highlight=False)


# --- batches ----------------------------------------------------------------------------------


@app.command()
@handled
def ingest(
    location: Annotated[str, typer.Argument(help="s3://bucket/prefix or a local folder")],
    provider: ProviderOpt = "baidu",
    include: Annotated[Optional[list[str]], typer.Option(help="glob on the key below the prefix, e.g. '*.pdf' (repeatable)")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(help="glob to leave out (repeatable)")] = None,
    option: OptionOpt = None,
    batch: BatchOpt = None,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = 24 * 3600.0,
    retry_failed: Annotated[bool, typer.Option(help="send again documents whose archive holds an error.json")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Send every document under a prefix, listing and enqueueing page by page; what is archived is skipped."""
    from pipeline import batches, preflight
    from pipeline.runtime import get_runtime

    _check_provider(provider)
    options = _options(option)
    if not location.startswith("s3://") and not Path(location).expanduser().exists():
        raise FileNotFoundError(f"{location}: no such file or folder")
    preflight.check_for_batch(provider, _source_bucket(location))
    name = batches.check_name(batch) if batch else batches.new_name(provider)
    batches.create(get_runtime().redis, name, provider=provider, location=location, options=options)
    if not as_json:
        console.print(f"batch [bold]{name}[/]: {location} -> {provider}")
    filled = _fill(
        name,
        as_json,
        lambda each: batches.fill_location(
            name, location, provider, options, include=include or (), exclude=exclude or (), retry_failed=retry_failed, on_each=each
        ),
    )
    _finish(name, filled, wait, timeout, as_json)


@app.command()
@handled
def submit(
    files: Annotated[list[str], typer.Argument(help="local paths or s3:// URIs")],
    provider: ProviderOpt = "baidu",
    option: OptionOpt = None,
    batch: BatchOpt = None,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = 3600.0,
    retry_failed: Annotated[bool, typer.Option(help="send again documents whose archive holds an error.json")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Send the named documents as one batch."""
    from pipeline import batches, preflight
    from pipeline.runtime import get_runtime

    _check_provider(provider)
    options = _options(option)
    preflight.check_for_batch(provider)
    name = batches.check_name(batch) if batch else batches.new_name(provider)
    batches.create(get_runtime().redis, name, provider=provider, location=" ".join(files)[:500], options=options)
    if not as_json:
        console.print(f"batch [bold]{name}[/]: {len(files)} documents -> {provider}")
    filled = _fill(name, as_json, lambda each: batches.fill(name, files, provider, options, retry_failed=retry_failed, on_each=each))
    _finish(name, filled, wait, timeout, as_json)


@app.command()
@handled
def status(
    batch: Annotated[Optional[str], typer.Argument(help="a batch name (none: the recent batches)")] = None,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = 24 * 3600.0,
    as_json: JsonOpt = False,
) -> None:
    """A batch's counts per state, failures by reason, throughput and ETA; --wait follows it live."""
    from pipeline import batches, jobs, preflight, progress
    from pipeline.runtime import get_runtime

    client = get_runtime().redis
    preflight.check_redis(client)
    if batch is None:
        listed = [batches.status(client, name) for name in batches.names(client)]
        if as_json:
            _emit([s.as_dict() for s in listed])
        for s in [] if as_json else listed:
            console.print(f"{s.name}  {s.provider}  {s.finished}/{s.total}  {progress.describe(s)}", highlight=False)
        raise typer.Exit(OK)
    if not batches.exists(client, batch):
        record = jobs.read(client, batch)
        if not record:
            raise batches.BatchError(f"no batch (or job) named {batch!r}; `docpipe status` lists the batches")
        _emit(record) if as_json else console.print_json(data=record)
        raise typer.Exit(FAILED if record.get("state") == "failed" else OK)
    if wait:
        current = batches.Batch(batch).wait(timeout=timeout) if as_json else progress.watch([batch], timeout=timeout, console=console)[batch]
    else:
        current = batches.status(client, batch)
    if as_json:
        _emit(current.as_dict())
    else:
        _print_status(current)
    raise typer.Exit(_exit_code(current, waited=wait))


def _print_status(s) -> None:
    from pipeline import progress

    console.print(f"batch [bold]{s.name}[/] ({s.provider}, {s.location})", highlight=False)
    console.print(f"  {s.finished}/{s.total} finished{'' if s.listing_done else ' (still listing)'}; {progress.describe(s)}")
    if s.skipped or s.refused:
        console.print(f"  {s.skipped} already archived when listed, {s.refused} refused")
    for reason, count in s.reasons.items():
        console.print(f"  [red]failed[/] {count} x {reason}", highlight=False)


@app.command("jobs")
@handled
def list_jobs(
    batch: str,
    state: Annotated[Optional[str], typer.Option(help="only documents in this state (queued, submitted, done, failed, ...)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The documents of a batch, one per line (NDJSON with --json)."""
    from pipeline import batches
    from pipeline.runtime import get_runtime

    client = get_runtime().redis
    if not batches.exists(client, batch):
        raise batches.BatchError(f"no batch named {batch!r}")
    for member in batches.members(client, batch, state=state):
        if as_json:
            _emit(member.as_dict())
        else:
            console.print(f"{member.job_id}  {member.state:<9} {member.source}  {member.reason} {member.error}".rstrip(), highlight=False)
    if state in (None, "refused"):
        for source, reason in batches.refused_sources(client, batch).items():
            _emit({"source": source, "state": "refused", "error": reason}) if as_json else console.print(f"-  refused   {source}  {reason}")


@app.command()
@handled
def result(job_id: str, as_json: JsonOpt = False) -> None:
    """Print a document's archived result.json, or its error.json (exit 1)."""
    from pipeline import jobs, storage
    from pipeline.runtime import get_runtime

    record = jobs.read(get_runtime().redis, job_id)
    candidates = [record["provider"]] if record.get("provider") else list(provider_names())
    for provider in candidates:
        final = storage.finished(provider, job_id)
        if final:
            body = storage.get_json(storage.archive_prefix(provider, job_id) + final)
            _emit(body) if as_json else console.print_json(data=body)
            raise typer.Exit(OK if final == "result.json" else FAILED)
    if record:
        message = f"{job_id} is not finished (state {record.get('state')})"
        _emit({"job_id": job_id, "state": record.get("state"), "finished": False}) if as_json else console.print(message)
        raise typer.Exit(FAILED)
    raise FileNotFoundError(f"no job {job_id!r} in Redis or the archive")


@app.command()
@handled
def retry(
    batch: str,
    all_failures: Annotated[bool, typer.Option("--all", help="every failure, not only those error.json calls retryable")] = False,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = 24 * 3600.0,
    as_json: JsonOpt = False,
) -> None:
    """Send again the batch's failures whose error.json says a retry could help (--all: every failure)."""
    from pipeline import batches, preflight
    from pipeline.runtime import get_runtime

    client = get_runtime().redis
    preflight.check_redis(client)
    if not batches.exists(client, batch):
        raise batches.BatchError(f"no batch named {batch!r}")
    plan = batches.retry_plan(client, batch, every_failure=all_failures)
    if not as_json:
        for member, why in plan.kept:
            console.print(f"not retried {member.source}: {why}", highlight=False)
    filled = batches.resend(batch, plan.resend)
    if as_json and not wait:
        _emit({"batch": batch, "retried": filled.enqueued, "refused": filled.refused, "kept": [{**m.as_dict(), "why": w} for m, w in plan.kept]})
    elif not as_json:
        console.print(f"batch {batch}: {filled.enqueued} sent again, {len(plan.kept)} kept as failed, {filled.refused} refused")
    if wait:
        _finish(batch, filled, True, timeout, as_json)
    raise typer.Exit(FAILED if filled.refused else OK)


@app.command()
@handled
def cancel(batch: str, as_json: JsonOpt = False) -> None:
    """Stop the batch's documents no provider has seen yet; name those already at the provider."""
    from pipeline import batches
    from pipeline.runtime import get_runtime

    client = get_runtime().redis
    if not batches.exists(client, batch):
        raise batches.BatchError(f"no batch named {batch!r}")
    outcome = batches.cancel(client, batch)
    if as_json:
        _emit({"batch": batch, "cancelled": outcome.cancelled, "at_provider": [m.as_dict() for m in outcome.at_provider], "ended": outcome.ended})
    else:
        console.print(f"batch {batch}: {outcome.cancelled} cancelled, {outcome.ended} had already ended")
        for member in outcome.at_provider:
            console.print(f"already at the provider (task {member.provider_task_id or 'unknown'}): {member.source}", highlight=False)
    raise typer.Exit(OK)


# --- set-up and services ----------------------------------------------------------------------


@app.command()
@handled
def init(
    also: Annotated[Optional[list[str]], typer.Option("--also", help="another bucket to create (an inbox), repeatable")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create the staging and results buckets (once per deployment)."""
    from botocore.exceptions import BotoCoreError, ClientError

    from pipeline import storage
    from pipeline.config import get_settings
    from pipeline.preflight import ConfigError

    settings = get_settings()
    try:
        created = storage.ensure_buckets(settings, also or ())
    except (ClientError, BotoCoreError) as exc:
        raise ConfigError(f"cannot create buckets at {settings.s3_endpoint_url or 'AWS S3'}: {type(exc).__name__}") from None
    report = {"staging": settings.staging_bucket, "results": settings.results_bucket, "also": also or [], "created": created}
    _emit(report) if as_json else console.print(f"buckets ready: {settings.staging_bucket}, {settings.results_bucket} (created: {', '.join(created) or 'none'})")


@app.command()
@handled
def reconcile(as_json: JsonOpt = False) -> None:
    """Run one pass of the reconciler now (every worker runs it every few seconds): re-drive each job
    whose record stopped moving (its worker died, its message was lost, its step is stuck)."""
    from pipeline import preflight
    from pipeline.reconcile import Reconciler
    from pipeline.runtime import get_runtime
    from workers.tasks import publish_redriven

    rt = get_runtime()
    preflight.check_redis(rt.redis)
    done = Reconciler(rt.redis, rt.ledger, publish_redriven, backlog_grace=rt.settings.backlog_grace).run_once()
    if as_json:
        _emit({"redriven": [{"job_id": job_id, "why": why} for job_id, why in done.redriven]})
    else:
        for job_id, why in done.redriven:
            console.print(f"re-driven {job_id}: {why}")
        console.print(f"{len(done.redriven)} jobs re-driven")


@app.command("settings")
def show_settings() -> None:
    """Print every DOCPIPE_* setting with its default, as the README's table (generated from the model)."""
    from pipeline.config import settings_table

    sys.stdout.write(settings_table())


@app.command()
def callbacks(
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0 to accept callbacks from other machines)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port; DOCPIPE_CALLBACK_BASE_URL must reach it")] = 8090,
) -> None:
    """Serve the callback receiver that callback providers (tuputech) deliver results to."""
    import uvicorn

    from pipeline.callbacks import create_app

    # Idle connections stay open 75 s (nginx's default): far longer than a provider's client keeps
    # one (httpx: 5 s), so that the client, not the receiver, closes it. At equal times a download
    # sent as the receiver closed its connection failed, and tuputech fails a task whose document
    # it could not fetch (code 14).
    uvicorn.run(create_app(), host=host, port=port, log_level="warning", access_log=False, timeout_keep_alive=75)


@app.command()
def metrics(
    host: Annotated[str, typer.Option(help="address to listen on")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="port of /metrics")] = 9808,
) -> None:
    """Serve the deployment-wide Prometheus gauges (documents by state, failures, leases, queues) from Redis."""
    from pipeline.metrics import serve_exporter

    serve_exporter(port, host)
    console.print(f"metrics on http://{host}:{port}/metrics")
    _sleep_until_signalled()


@app.command()
def secrets(
    out: Annotated[Path, typer.Option(help="folder for the secret files (created, mode 700)")] = Path("secrets"),
    force: Annotated[bool, typer.Option(help="replace files that exist")] = False,
) -> None:
    """Make every secret docker-compose.yml reads from files: the Redis and MinIO passwords, Flower's
    login, the emulators' demo credentials, and the tuputech RSA key pairs (ours signs submits and its
    public half goes to tuputech; the emulator's signs callbacks). Each file is named as the setting
    that reads it (``docpipe_<setting>``, see DOCPIPE_SECRETS_DIR)."""
    import secrets as random

    from pipeline.providers.tuputech_wire import generate_key_pair

    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    redis_password, minio_password = random.token_urlsafe(24), random.token_urlsafe(24)
    ours_private, ours_public = generate_key_pair()
    theirs_private, theirs_public = generate_key_pair()
    files = {
        "redis_password": redis_password,
        "docpipe_redis_url": f"redis://:{redis_password}@redis:6379/0",
        "minio_root_user": "docpipe",
        "minio_root_password": minio_password,
        "docpipe_aws_access_key_id": "docpipe",
        "docpipe_aws_secret_access_key": minio_password,
        "flower_basic_auth": f"docpipe:{random.token_urlsafe(18)}",
        "docpipe_baidu_api_key": "demo-api-key",  # the emulators' demo account: replace with real keys
        "docpipe_baidu_secret_key": random.token_urlsafe(18),
        "docpipe_idp_username": "demo",
        "docpipe_idp_password": random.token_urlsafe(18),
        "docpipe_tuputech_secret_id": "demo-secret-id",
        "docpipe_tuputech_private_key": ours_private,  # signs our submits
        "tuputech_client_public_key": ours_public,  # give it to tuputech (the emulator reads it)
        "docpipe_tuputech_public_key": theirs_public,  # tuputech's key; with the real service, theirs
        "emulator_tuputech_private_key": theirs_private,  # the emulator signs callbacks with it
    }
    written, kept = [], []
    for name, value in files.items():
        path = out / name
        if path.exists() and not force:
            kept.append(name)
            continue
        path.touch(mode=0o600)
        path.write_text(value)
        written.append(name)
    console.print(f"{out}/: wrote {len(written)} files" + (f", kept {len(kept)} that exist (--force replaces them)" if kept else ""))


@app.command()
def demo(
    count: Annotated[int, typer.Option(help="how many sample documents to make")] = 24,
    workers: Annotated[int, typer.Option(help="Celery worker processes")] = 2,
    out: Annotated[Path, typer.Option(help="where the archive is copied")] = Path("demo-output"),
    keep_up: Annotated[bool, typer.Option("--keep-up", help="leave the stack running for Flower until Ctrl-C")] = False,
    providers: Annotated[str, typer.Option(help="comma-separated providers to run")] = ",".join(provider_names()),
) -> None:
    """Run a sample batch through a local stack (Redis, S3, emulators, callbacks, workers, Flower)."""
    from pipeline.demo import run_demo

    chosen = _providers(providers)
    raise typer.Exit(run_demo(count=count, workers=workers, out=out, keep_up=keep_up, console=console, providers=chosen))


def _providers(text: str) -> tuple[str, ...]:
    chosen = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = set(chosen) - set(provider_names())
    if unknown:
        raise typer.BadParameter(f"unknown providers: {', '.join(sorted(unknown))}")
    return chosen


UP_STATE = Path("~/.docpipe/up.json").expanduser()


@app.command()
def up(
    workdir: Annotated[Path, typer.Option(help="logs and data of the local stack")] = Path("~/.docpipe/stack"),
    workers: Annotated[int, typer.Option(help="Celery worker processes")] = 2,
    providers: Annotated[str, typer.Option(help="comma-separated providers")] = ",".join(provider_names()),
) -> None:
    """Start the local stack (Redis, S3, emulators, receiver, workers, Flower) as processes, print every
    URL and the environment that points docpipe at it, and run until Ctrl-C, SIGTERM or `docpipe down`."""
    import faulthandler

    from pipeline.devstack import LocalStack

    # A stack that will not stop can be asked where it is: `kill -USR1 <pid>` prints every thread's stack.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    chosen = _providers(providers)
    stack = LocalStack(workdir.expanduser().resolve(), settings={"DOCPIPE_TUPUTECH_CALLBACK_RULE": "all"})
    try:
        with console.status("starting the local stack..."):
            stack.start_all(chosen, workers, name="up")
        env_file = stack.workdir / "docpipe.env"
        env_file.touch(mode=0o600)
        env_file.write_text("".join(f"export {k}={json.dumps(v)}\n" for k, v in sorted(stack.env.items())))
        user, password = stack.flower_auth or ("", "")
        console.print(f"Redis     redis://127.0.0.1:{stack.ports['redis']}/0")
        console.print(f"S3        http://127.0.0.1:{stack.ports['s3']} (buckets {', '.join(_bucket_names())})")
        for p in chosen:
            console.print(f"{p:<9} {stack.emulator_url(p)} (emulator)")
        console.print(f"callbacks http://127.0.0.1:{stack.ports['callbacks']}")
        console.print(f"Flower    {stack.flower_url} (user {user}, password {password})")
        console.print(f"workers   {workers} on {', '.join(f'docpipe.{p}' for p in chosen)}; logs in {stack.workdir}")
        console.print(f"to use it from a shell: source {env_file}   (stop: Ctrl-C or `docpipe down`)")
        UP_STATE.parent.mkdir(parents=True, exist_ok=True)
        UP_STATE.write_text(json.dumps({"pid": os.getpid(), "workdir": str(stack.workdir)}))
        _sleep_until_signalled()
    except KeyboardInterrupt:
        pass
    finally:
        console.print("stopping the local stack")
        try:
            stack.stop()
        except KeyboardInterrupt:
            pass  # signalled again while stopping: the stop held the signal back and finished first
        finally:
            UP_STATE.unlink(missing_ok=True)


def _bucket_names() -> list[str]:
    from pipeline.config import get_settings

    s = get_settings()
    return [s.staging_bucket, s.results_bucket]


@app.command()
@handled
def down(timeout: Annotated[float, typer.Option(help="seconds to wait for it to stop")] = 60.0) -> None:
    """Stop the stack `docpipe up` runs."""
    try:
        pid = int(json.loads(UP_STATE.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        errors.print("docpipe: no local stack is up")
        raise typer.Exit(USAGE) from None
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        UP_STATE.unlink(missing_ok=True)
        errors.print("docpipe: the stack's process was gone already")
        raise typer.Exit(OK) from None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _running(pid):
            console.print("local stack stopped")
            raise typer.Exit(OK)
        time.sleep(0.2)
    raise TimeoutError(f"the stack (pid {pid}) still runs after {timeout:.0f}s")


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited process its parent has not reaped yet still answers kill 0)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True  # no /proc here: kill 0 is all we know


def _sleep_until_signalled() -> None:
    """Block until Ctrl-C, SIGTERM or SIGHUP (turned into KeyboardInterrupt)."""
    from pipeline.devstack import interrupt_on_termination

    interrupt_on_termination()
    while True:
        # Short naps: the kernel may hand SIGHUP/SIGTERM to any thread of the process; Python runs
        # the handler in the main thread only when it next executes, and a one-hour sleep in the
        # main thread is not interrupted by a signal another thread took (`up` then ignored SIGHUP).
        time.sleep(0.5)


def main() -> None:
    from pipeline import logs
    from pipeline.config import get_settings

    logs.configure(get_settings().log_format, level=logging.WARNING)
    app()


if __name__ == "__main__":
    main()
