"""CLI commands for models (list, verify, test, train, demo) and the one-command ``demo``."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from node import models
from node.cli import JsonOpt, app, emit, err, make_table, out, state
from node.errors import NodeError

DEMO_NODE_DIR = "aidnode-demo-node"  # under --workdir; removed and rebuilt by each demo run

model_app = typer.Typer(no_args_is_help=True,
                        help="Model packages.\n\nExample: aidnode model list")
app.add_typer(model_app, name="model")


@contextmanager
def training_bar(enabled: bool = True) -> Iterator[Callable[[int, int, float], None]]:
    """A progress bar fed by the trainer's (step, total, loss) callback."""
    with Progress(TextColumn("training"), BarColumn(), TextColumn("{task.completed}/{task.total}"
                  " loss {task.fields[loss]:.4f}"), TimeRemainingColumn(), console=err,
                  disable=not enabled) as bar:
        task = bar.add_task("train", total=None, loss=float("nan"))

        def update(step: int, total: int, loss: float) -> None:
            bar.update(task, completed=step, total=total, loss=loss)

        yield update


@model_app.command("list")
def model_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Installed model packages.

    Example: aidnode model list
    """
    cfg = state(ctx).config
    data = [{"name": m.name, "version": m.version, "path": str(m.directory),
             "used_by": [r.name for r in cfg.rules
                         if models.model_dir(cfg, r.model) == m.directory]}
            for m in models.installed(cfg)]
    emit(data, as_json, make_table("models", ["name", "version", "path", "rules"],
                                   [[d["name"], d["version"], d["path"], ", ".join(d["used_by"])]
                                    for d in data]))


@model_app.command("verify")
def model_verify(directory: Path, as_json: JsonOpt = False) -> None:
    """Check a model package (card, labels, weights, checksum).

    Example: aidnode model verify var/models/demo
    """
    from inference.package import verify_package

    problems = verify_package(directory)
    emit({"package": str(directory), "ok": not problems, "problems": problems}, as_json,
         f"{directory}: OK" if not problems else f"{directory}: {len(problems)} problem(s)\n  "
         + "\n  ".join(problems))
    if problems:
        raise typer.Exit(1)


@model_app.command("test")
def model_test(directory: Path, files: list[Path], as_json: JsonOpt = False,
               device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto") -> None:
    """Run a model package on DICOM files of one study and print the findings.

    Example: aidnode model test var/models/demo image.dcm
    """
    from pydicom import dcmread

    from inference.package import load_package
    from inference.predict import Predictor

    predictor = Predictor(load_package(directory), device=device)
    pred = predictor.predict([dcmread(f) for f in files])
    emit(pred.summary(), as_json, make_table(
        f"{pred.model_name} {pred.model_version} on {pred.device}, {len(pred.analysed)} images, "
        f"{pred.seconds:.2f}s", ["finding", "probability", "threshold", "result"],
        [[f.label.code_meaning, f"{f.probability:.3f}", f.label.threshold,
          "PRESENT" if f.present else "absent"] for f in pred.findings]))


@model_app.command("train")
def model_train(
        folder: Annotated[Path, typer.Argument(help="Folder of DICOM files.")],
        labels_csv: Annotated[Path, typer.Argument(help="CSV: sop_instance_uid or file, then "
                                                        "one 0/1 column per label.")],
        out_dir: Annotated[Path, typer.Option("--out", help="Package folder to write.")],
        labels_json: Annotated[Path, typer.Option(
            "--labels", help="JSON list of labels: key, coding_scheme, code_value, "
                             "code_meaning, threshold.")],
        steps: Annotated[int, typer.Option(help="Training steps.")] = 1000,
        seed: int = 0, name: str = "site-model", version: str = "0.1.0",
        as_json: JsonOpt = False) -> None:
    """Train a package on your own labelled DICOM files; prints held-out AUROC per finding.

    Example: aidnode model train data/ labels.csv --labels labels.json --out var/models/site
    """
    from inference.prediction import LabelCode
    from inference.train import samples_from_folder, train

    try:
        labels = [LabelCode(**x) for x in json.loads(labels_json.read_text())]
    except (ValueError, TypeError) as exc:
        raise NodeError(f"{labels_json}: not a JSON list of labels: {exc}") from exc
    samples = samples_from_folder(folder, labels_csv, [lb.key for lb in labels])
    if len(samples) < 10:
        raise NodeError(f"only {len(samples)} labelled images found in {folder}; need 10+")
    with training_bar(not as_json) as bar:
        report = train(samples, labels, out_dir, steps=steps, seed=seed, progress=bar,
                       name=name, version=version)
    emit(report.__dict__, as_json, str(report))


@model_app.command("demo")
def model_demo(ctx: typer.Context,
               steps: Annotated[int | None, typer.Option(help="Training steps.")] = None,
               force: Annotated[bool, typer.Option(help="Rebuild if present.")] = False,
               as_json: JsonOpt = False) -> None:
    """Build the synthetic-data demo model offline (a few minutes on CPU).

    Prints its held-out AUROC and heatmap pointing accuracy.

    Example: aidnode model demo
    """
    from inference.train import build_demo_package

    cfg = state(ctx).config
    target = models.model_dir(cfg, models.DEMO)
    if (target / "model.json").exists() and not force:
        out.print(f"demo model already at {target} (use --force to rebuild)")
        return
    with training_bar(not as_json) as bar:
        report = build_demo_package(target, steps=steps or cfg.inference.demo_steps, seed=0,
                                    progress=bar)
    emit(report.__dict__, as_json, str(report))


def _wait(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise NodeError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.2)


@app.command()
def demo(ctx: typer.Context,
         workdir: Annotated[Path | None, typer.Option(help="Where files go (default: a new "
                                                           "temporary folder).")] = None,
         timeout: Annotated[float, typer.Option(help="Seconds to wait for results.")] = 600,
         as_json: JsonOpt = False) -> None:
    """Run the whole loop on this machine: node, stand-in PACS, synthetic study, results.

    A generated study goes in, the SR and heatmap SC come back out, PNGs are written.

    Example: aidnode demo
    """
    import socket

    from pydicom import dcmread

    from inference.synthetic import phantom_study
    from node.config import load_config
    from node.scu import Peer, send_files
    from node.service import Service, open_storage
    from node.standin import StandInPACS
    from storage import clock

    base_cfg = state(ctx).config
    work = workdir or Path(tempfile.mkdtemp(prefix="aidnode-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    # The demo's own node lives in a folder only it uses; a re-run starts from an empty one.
    shutil.rmtree(work / DEMO_NODE_DIR, ignore_errors=True)
    if not (models.model_dir(base_cfg, models.DEMO) / "model.json").exists():
        from inference.train import build_demo_package

        err.print("building the demo model first (once; a few minutes on CPU)")
        with training_bar(not as_json) as bar:
            build_demo_package(models.model_dir(base_cfg, models.DEMO),
                               steps=base_cfg.inference.demo_steps, seed=0, progress=bar)
    pacs = StandInPACS(work / "pacs")
    pacs_port = pacs.start()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        node_port = sock.getsockname()[1]
    cfg_file = work / "demo.toml"
    cfg_file.write_text(f"""
[node]
host = "127.0.0.1"
port = {node_port}
[[peers]]
ae_title = "*"
host = "127.0.0.1"
[storage]
root = "{DEMO_NODE_DIR}/store"
min_free_mb = 64
[database]
url = "sqlite:///{DEMO_NODE_DIR}/aidnode.db"
[assembly]
stable_after_s = 1
check_interval_s = 0.2
[[rules]]
name = "demo"
model = {json.dumps(str(models.model_dir(base_cfg, models.DEMO)))}
destinations = ["standin"]
[[destinations]]
name = "standin"
ae_title = "STANDIN_PACS"
host = "127.0.0.1"
port = {pacs_port}
[inference]
models_dir = {json.dumps(str(base_cfg.inference.models_dir))}
separate_process = false   # one study, nothing to receive beside it: no child process to start
[metrics]
enabled = false
""")
    since = clock.now()
    try:
        cfg = load_config(cfg_file, environ={})
        db, store = open_storage(cfg)
        db.upgrade()
        svc = Service(cfg, db, store)
        svc.start()
    except BaseException:
        pacs.stop()
        raise
    t0 = time.monotonic()
    try:
        study = phantom_study(seed=7, n_images=1, nodule=True, effusion=False)
        files = []
        for i, ds in enumerate(study):
            f = work / "study" / f"{i:03d}.dcm"
            f.parent.mkdir(exist_ok=True)
            ds.save_as(f, enforce_file_format=True)
            files.append(f)
        sent = send_files(Peer(cfg.node.ae_title, "127.0.0.1", node_port), files, "DEMO_SCU")
        if any(st != 0 for _, st in sent):
            raise NodeError(f"the node refused the demo study: {sent}")
        err.print(f"sent {len(files)} image(s) of a synthetic study; waiting for results")

        # Done when every DELIVER job (enqueued with the analysis's results) has succeeded:
        # the stand-in PACS then holds the SR and however many heatmaps the findings called for.
        _wait(lambda: _demo_delivered(db, since), timeout, "the results to reach the PACS")
    finally:
        svc.stop(grace_s=5)
        pacs.stop()
    objs = [dcmread(p) for p in list(pacs.received)]
    pngs = _write_pngs(objs, work)
    with db.read() as s:
        from sqlalchemy import select

        from storage.models import Result

        summary = s.execute(select(Result.summary)).scalars().first() or {}
    data = {"seconds": round(time.monotonic() - t0, 1), "workdir": str(work),
            "received_by_pacs": [str(p) for p in pacs.received], "heatmap_pngs": pngs,
            "findings": summary.get("findings", [])}
    if as_json:
        return emit(data, True)
    out.print(f"results back in the stand-in PACS after {data['seconds']}s "
              f"({len(objs)} objects: {', '.join(sorted({str(d.Modality) for d in objs}))})")
    for f in data["findings"]:
        out.print(f"  {f['meaning']:<20} p={f['probability']:.3f}  "
                  f"{'PRESENT' if f['present'] else 'absent'}")
    out.print(f"files: {pacs.folder}")
    for p in pngs:
        out.print(f"heatmap: {p}")
    out.print("Synthetic-data demo model: not for diagnostic use.")


def _demo_delivered(db: Any, since: Any) -> bool:
    """True once the demo's jobs delivered everything; NodeError as soon as one failed."""
    from sqlalchemy import select

    from storage.models import Job, JobKind, JobStatus

    with db.read() as s:
        rows = s.execute(select(Job.id, Job.kind, Job.status, Job.last_error)
                         .where(Job.created_at >= since)).all()
    for r in rows:
        if r.status in (JobStatus.FAILED, JobStatus.CANCELLED):
            raise NodeError(f"the demo's {r.kind.value} job {r.id} failed: {r.last_error}")
    delivers = [r for r in rows if r.kind == JobKind.DELIVER]
    return bool(delivers) and all(r.status == JobStatus.SUCCEEDED for r in delivers)


def _write_pngs(objs: list[Any], work: Path) -> list[str]:
    from PIL import Image

    out_paths: list[str] = []
    for d in objs:
        if d.Modality != "SR" and d.get("SamplesPerPixel") == 3:
            p = work / f"heatmap-{len(out_paths) + 1}.png"
            Image.fromarray(d.pixel_array).save(p)
            out_paths.append(str(p))
    return out_paths
