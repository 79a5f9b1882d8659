"""CLI commands over the database: status, studies, jobs, deliveries, rules, audit, purge."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from sqlalchemy import func, select

from node.cli import (
    JsonOpt,
    YesOpt,
    app,
    audit_admin,
    emit,
    make_table,
    out,
    require_yes,
    state,
)
from node.errors import NodeError
from node.workerproc import RESTART_DELAY_S
from storage import clock, jobs, registry
from storage.models import (
    Delivery,
    Job,
    JobKind,
    JobStatus,
    Result,
    ResultObject,
    Series,
    Study,
)

LimitOpt = Annotated[int, typer.Option("--limit", "-n", help="Rows to show.")]


def _age(ts: Any) -> str:
    if ts is None:
        return ""
    secs = (clock.now() - ts).total_seconds()
    return f"{secs:.0f}s" if secs < 120 else f"{secs / 60:.0f}m" if secs < 7200 else \
        f"{secs / 3600:.1f}h"


@app.command()
def status(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Node status: processes and roles, models, queues, failing deliveries, disk, errors.

    Example: aidnode status --json
    """
    from node import models

    cfg = state(ctx).config
    db, store = state(ctx).storage()
    with db.read() as s:
        queues = {}
        for kind in JobKind:
            n, oldest = s.execute(select(func.count(), func.min(Job.created_at)).where(
                Job.kind == kind, Job.status == JobStatus.QUEUED)).one()
            running = s.execute(select(func.count()).where(
                Job.kind == kind, Job.status == JobStatus.RUNNING)).scalar()
            dead = s.execute(select(func.count()).where(
                Job.kind == kind, Job.status == JobStatus.FAILED)).scalar()
            queues[kind.value] = {"queued": n, "running": running, "dead": dead,
                                  "oldest_age_s": (clock.now() - oldest).total_seconds()
                                  if oldest else None}
        failing = dict(s.execute(select(Job.destination, func.count()).where(
            Job.kind == JobKind.DELIVER, Job.status.in_([JobStatus.QUEUED, JobStatus.FAILED]),
            Job.last_error.is_not(None)).group_by(Job.destination)).all())
        errors = [{"job": j.id, "kind": j.kind.value, "at": j.updated_at, "error": j.last_error}
                  for j in s.execute(select(Job).where(Job.last_error.is_not(None))
                                     .order_by(Job.updated_at.desc()).limit(5)).scalars()]
        studies = s.execute(select(func.count()).select_from(Study)).scalar()
        procs = registry.nodes(s)
        deaths = registry.worker_deaths(s)
    data = {
        "processes": [p.as_dict() for p in procs],
        "worker_process_deaths": [d.as_dict() for d in deaths],
        "listening": f"{cfg.node.ae_title}@{cfg.node.host}:{cfg.node.port}",
        "models": [{"name": m.name, "version": m.version, "path": str(m.directory)}
                   for m in models.installed(cfg)],
        "device": cfg.inference.device,
        "studies": studies, "queues": queues, "failing_deliveries": failing,
        "disk_free_bytes": store.free_bytes(), "last_errors": errors,
    }
    if as_json:
        return emit(data, True)
    out.print(f"listening  {data['listening']}    device {cfg.inference.device}    "
              f"disk free {data['disk_free_bytes'] / 2**30:.1f} GiB    studies {studies}")
    out.print("models     " + (", ".join(f"{m['name']} {m['version']}" for m in data["models"])
                              or "none installed (run `aidnode model demo`)"))
    out.print(make_table("queues", ["kind", "queued", "running", "dead", "oldest"], [
        [k, q["queued"], q["running"], q["dead"],
         f"{q['oldest_age_s']:.0f}s" if q["oldest_age_s"] is not None else ""]
        for k, q in queues.items()]))
    if failing:
        out.print("failing deliveries: " + ", ".join(f"{d}: {n}" for d, n in failing.items()))
    out.print(make_table("processes", ["host", "pid", "role", "heartbeat", "jobs in hand"], [
        [p.host, p.pid, p.role,
         f"{(clock.now() - p.heartbeat_at).total_seconds():.0f}s ago"
         + (" (stale: stopped?)" if p.stale else ""), p.jobs_in_hand] for p in procs]))
    if not procs:
        out.print("no `aidnode serve` process is registered (none running?)")
    for d in deaths:
        out.print(f"worker process of {d.process}: died {d.count} time(s) in the last hour, "
                  f"last {_age(d.last_at)} ago ({d.last_exit}); "
                  + ("a worker process has registered on its host since" if d.running else
                     "NONE RUNNING NOW: it is started again, at most every "
                     f"{RESTART_DELAY_S[1]:.0f} s; the service log says why it stops"))
    for e in errors:
        out.print(f"  job {e['job']} ({e['kind']}): {e['error']}")


studies_app = typer.Typer(no_args_is_help=True,
                        help="Received studies.\n\n"
                             "Example: aidnode studies list")
app.add_typer(studies_app, name="studies")


@studies_app.command("list")
def studies_list(ctx: typer.Context, limit: LimitOpt = 50, as_json: JsonOpt = False) -> None:
    """Received studies with their state.

    Example: aidnode studies list -n 20
    """
    db, _ = state(ctx).storage()
    with db.read() as s:
        rows = list(s.execute(select(Study).order_by(Study.last_received_at.desc())
                              .limit(limit)).scalars())
    data = [{"study_uid": r.study_instance_uid, "state": r.state.value,
             "instances": r.instance_count, "description": r.study_description,
             "from": r.calling_ae, "last_received": r.last_received_at, "rule": r.rule}
            for r in rows]
    emit(data, as_json, make_table("studies", ["study UID", "state", "instances", "from",
                                               "last received", "rule"],
                                   [[d["study_uid"], d["state"], d["instances"], d["from"],
                                     _age(d["last_received"]) + " ago", d["rule"]]
                                    for d in data]))


@studies_app.command("show")
def studies_show(ctx: typer.Context, study_uid: str, as_json: JsonOpt = False) -> None:
    """One study: series, jobs, results.

    Example: aidnode studies show 1.2.3.4
    """
    db, _ = state(ctx).storage()
    with db.read() as s:
        st = s.execute(select(Study).where(Study.study_instance_uid == study_uid)).scalar()
        if st is None:
            raise NodeError(f"no study {study_uid}")
        series = [{"series_uid": r.series_instance_uid, "modality": r.modality,
                   "description": r.series_description, "instances": r.instance_count}
                  for r in s.execute(select(Series).where(Series.study_id == st.id)).scalars()]
        job_rows = [{"id": j.id, "kind": j.kind.value, "status": j.status.value,
                     "destination": j.destination, "attempts": j.attempts,
                     "error": j.last_error}
                    for j in s.execute(select(Job).where(Job.study_id == st.id)
                                       .order_by(Job.id)).scalars()]
        results = [{"id": r.id, "model": f"{r.model_name} {r.model_version}",
                    "superseded_by": r.superseded_by, "summary": r.summary,
                    "objects": [{"kind": o.kind, "sop_instance_uid": o.sop_instance_uid,
                                 "label": o.label} for o in r.objects]}
                   for r in s.execute(select(Result).where(Result.study_id == st.id)).scalars()]
        data = {"study_uid": study_uid, "state": st.state.value, "instances": st.instance_count,
                "rule": st.rule, "series": series, "jobs": job_rows, "results": results}
    if as_json:
        return emit(data, True)
    out.print(f"study {study_uid}: {data['state']}, {data['instances']} instances, "
              f"rule {data['rule']}")
    out.print(make_table("series", ["series UID", "modality", "description", "instances"],
                         [list(x.values()) for x in series]))
    out.print(make_table("jobs", ["id", "kind", "status", "destination", "attempts", "error"],
                         [list(x.values()) for x in job_rows]))
    for r in results:
        out.print(f"result {r['id']} ({r['model']})"
                  + (f", superseded by {r['superseded_by']}" if r["superseded_by"] else ""))
        for f in r["summary"].get("findings", []):
            out.print(f"  {f['meaning']}: p={f['probability']:.3f} "
                      f"{'PRESENT' if f['present'] else 'absent'}")


jobs_app = typer.Typer(no_args_is_help=True,
                     help="The job queue (ANALYZE, DELIVER).\n\n"
                          "Example: aidnode jobs list --status FAILED")
app.add_typer(jobs_app, name="jobs")


def _job_dict(j: Job) -> dict[str, Any]:
    return {"id": j.id, "kind": j.kind.value, "status": j.status.value,
            "study_id": j.study_id, "destination": j.destination, "attempts": j.attempts,
            "max_attempts": j.max_attempts, "run_after": j.run_after, "worker": j.worker,
            "error": j.last_error, "updated": j.updated_at}


@jobs_app.command("list")
def jobs_list(ctx: typer.Context,
              status_: Annotated[str | None, typer.Option(
                  "--status", help="QUEUED, RUNNING, SUCCEEDED, FAILED (dead letters), "
                                   "CANCELLED")] = None,
              kind: Annotated[str | None, typer.Option("--kind", help="ANALYZE or DELIVER")]
              = None, limit: LimitOpt = 50, as_json: JsonOpt = False) -> None:
    """Jobs, newest first.

    Example: aidnode jobs list --status FAILED
    """
    db, _ = state(ctx).storage()
    q = select(Job).order_by(Job.id.desc()).limit(limit)
    if status_:
        if status_.upper() not in JobStatus.__members__:
            raise typer.BadParameter(f"{status_!r} is not one of {', '.join(JobStatus)}",
                                     param_hint="--status")
        q = q.where(Job.status == JobStatus(status_.upper()))
    if kind:
        if kind.upper() not in JobKind.__members__:
            raise typer.BadParameter(f"{kind!r} is not one of {', '.join(JobKind)}",
                                     param_hint="--kind")
        q = q.where(Job.kind == JobKind(kind.upper()))
    with db.read() as s:
        data = [_job_dict(j) for j in s.execute(q).scalars()]
    emit(data, as_json, make_table("jobs", ["id", "kind", "status", "dest", "attempts",
                                            "updated", "error"],
                                   [[d["id"], d["kind"], d["status"], d["destination"],
                                     f"{d['attempts']}/{d['max_attempts']}",
                                     _age(d["updated"]) + " ago", (d["error"] or "")[:60]]
                                    for d in data]))


@jobs_app.command("show")
def jobs_show(ctx: typer.Context, job_id: int, as_json: JsonOpt = False) -> None:
    """One job with its events.

    Example: aidnode jobs show 12
    """
    db, _ = state(ctx).storage()
    with db.read() as s:
        j = s.get(Job, job_id)
        if j is None:
            raise NodeError(f"no job {job_id}")
        data = _job_dict(j) | {"payload": j.payload, "events": [
            {"at": e.at, "from": e.from_status, "to": e.to_status, "message": e.message}
            for e in j.events]}
    if as_json:
        return emit(data, True)
    out.print(f"job {job_id}: {data['kind']} {data['status']}, attempts "
              f"{data['attempts']}/{data['max_attempts']}, payload {data['payload']}")
    out.print(make_table("events", ["at", "from", "to", "message"],
                         [list(e.values()) for e in data["events"]]))


@jobs_app.command("retry")
def jobs_retry(ctx: typer.Context, job_ids: list[int]) -> None:
    """Re-queue dead-lettered or cancelled jobs.

    Example: aidnode jobs retry 12 13
    """
    db, _ = state(ctx).storage()
    for job_id in job_ids:
        with db.write() as s:
            jobs.retry(s, job_id)
        audit_admin(ctx, "jobs retry", job=job_id)
        out.print(f"job {job_id} re-queued")


@jobs_app.command("cancel")
def jobs_cancel(ctx: typer.Context, job_ids: list[int], yes: YesOpt = False) -> None:
    """Cancel queued or running jobs.

    Example: aidnode jobs cancel 12 --yes
    """
    require_yes(yes, "cancel")
    db, _ = state(ctx).storage()
    for job_id in job_ids:
        with db.write() as s:
            jobs.cancel(s, job_id)
        audit_admin(ctx, "jobs cancel", job=job_id)
        out.print(f"job {job_id} cancelled")


deliveries_app = typer.Typer(no_args_is_help=True,
                           help="Result deliveries to destinations.\n\n"
                                "Example: aidnode deliveries list --dead")
app.add_typer(deliveries_app, name="deliveries")


@deliveries_app.command("list")
def deliveries_list(ctx: typer.Context,
                    dead: Annotated[bool, typer.Option("--dead", help="Only dead letters.")]
                    = False, limit: LimitOpt = 50, as_json: JsonOpt = False) -> None:
    """DELIVER jobs and what each destination acknowledged.

    Example: aidnode deliveries list --dead
    """
    db, _ = state(ctx).storage()
    q = select(Job).where(Job.kind == JobKind.DELIVER).order_by(Job.id.desc()).limit(limit)
    if dead:
        q = q.where(Job.status == JobStatus.FAILED)
    with db.read() as s:
        data = []
        for j in s.execute(q).scalars():
            result_id = j.payload.get("result_id")
            total = s.execute(select(func.count()).where(
                ResultObject.result_id == result_id)).scalar()
            acked = s.execute(select(func.count()).select_from(Delivery).join(
                ResultObject, Delivery.object_id == ResultObject.id).where(
                ResultObject.result_id == result_id, Delivery.destination == j.destination)
            ).scalar()
            data.append(_job_dict(j) | {"result_id": result_id, "objects": total,
                                        "acknowledged": acked})
    emit(data, as_json, make_table("deliveries", ["job", "destination", "status", "acked",
                                                  "attempts", "error"],
                                   [[d["id"], d["destination"], d["status"],
                                     f"{d['acknowledged']}/{d['objects']}",
                                     f"{d['attempts']}/{d['max_attempts']}",
                                     (d["error"] or "")[:60]] for d in data]))


@deliveries_app.command("retry")
def deliveries_retry(ctx: typer.Context, job_ids: Annotated[list[int] | None, typer.Argument(
        help="DELIVER job ids; none means every dead letter")] = None) -> None:
    """Re-queue dead-lettered deliveries.

    Example: aidnode deliveries retry
    """
    db, _ = state(ctx).storage()
    with db.read() as s:
        ids = job_ids or list(s.execute(select(Job.id).where(
            Job.kind == JobKind.DELIVER, Job.status == JobStatus.FAILED)).scalars())
    for job_id in ids:
        with db.write() as s:
            j = s.get(Job, job_id)
            if j is None or j.kind != JobKind.DELIVER:
                raise NodeError(f"job {job_id} is not a delivery")
            jobs.retry(s, job_id)
        audit_admin(ctx, "deliveries retry", job=job_id)
    out.print(f"{len(ids)} deliveries re-queued")


rules_app = typer.Typer(no_args_is_help=True,
                      help="Routing rules.\n\n"
                           "Example: aidnode rules explain 1.2.826.0.1.3680043.8.498.1")
app.add_typer(rules_app, name="rules")


@rules_app.command("explain")
def rules_explain(ctx: typer.Context, study_uid: str, as_json: JsonOpt = False) -> None:
    """Which rule fires for a stored study and why (dry run, nothing is queued).

    Example: aidnode rules explain 1.2.826.0.1.3680043.8.498.1
    """
    from node.assembly import study_info
    from node.rules import evaluate

    cfg = state(ctx).config
    db, _ = state(ctx).storage()
    with db.read() as s:
        st = s.execute(select(Study).where(Study.study_instance_uid == study_uid)).scalar()
        if st is None:
            raise NodeError(f"no study {study_uid}")
        info = study_info(s, st)
    verdicts = [evaluate(r, info) for r in cfg.rules]
    fired = next((v.rule for v in verdicts if v.matched), None)
    data = {"study_uid": study_uid, "fires": fired,
            "rules": [{"rule": v.rule, "matched": v.matched, "reasons": list(v.reasons),
                       "series": list(v.series)} for v in verdicts]}
    if as_json:
        return emit(data, True)
    out.print(f"rule that fires: {fired or 'none (the study is stored, not analysed)'}")
    for v in verdicts:
        out.print(f"  {'MATCH' if v.matched else 'no   '} {v.rule}")
        for r in v.reasons:
            out.print(f"        {r}")


audit_app = typer.Typer(no_args_is_help=True,
                      help="Audit events.\n\n"
                           "Example: aidnode audit list --kind admin")
app.add_typer(audit_app, name="audit")


@audit_app.command("list")
def audit_list(ctx: typer.Context, kind: Annotated[str | None, typer.Option(
        "--kind", help="e.g. association-rejected, admin")] = None,
               limit: LimitOpt = 50, as_json: JsonOpt = False) -> None:
    """Audit events, newest first.

    Example: aidnode audit list --kind admin
    """
    from storage import audit

    db, _ = state(ctx).storage()
    with db.read() as s:
        data = [{"at": e.at, "kind": e.kind, "ae_title": e.ae_title, "host": e.host,
                 "detail": e.detail} for e in audit.recent(s, limit, kind)]
    emit(data, as_json, make_table("audit", ["at", "kind", "AE", "host", "detail"],
                                   [[d["at"], d["kind"], d["ae_title"], d["host"], d["detail"]]
                                    for d in data]))


@app.command()
def purge(ctx: typer.Context,
          older_than: Annotated[float, typer.Option("--older-than", help="Days.")],
          dry_run: Annotated[bool, typer.Option("--dry-run", help="Only count.")] = False,
          yes: YesOpt = False, as_json: JsonOpt = False) -> None:
    """Delete studies and results older than DAYS (never while a job needs them).

    Example: aidnode purge --older-than 30 --yes
    """
    from storage.retention import purge as do_purge

    if not dry_run:
        require_yes(yes, "purge")
    db, store = state(ctx).storage()
    rep = do_purge(db, store, older_than, dry_run=dry_run)
    if not dry_run:
        audit_admin(ctx, "purge", older_than_days=older_than, studies=rep.studies)
    emit(rep.__dict__, as_json, f"{'would purge' if dry_run else 'purged'} {rep.studies} "
         f"studies ({rep.files} files); {rep.skipped_busy} skipped with jobs in progress")
