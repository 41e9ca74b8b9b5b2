"""Run metrics: a JSONL log, TensorBoard event files, and a loss-curve PNG at the end.

Every record is one JSON object per line in ``metrics.jsonl`` ({"step", "split", ...figures});
TensorBoard gets the scalar figures under ``<split>/<name>``. The PNG is drawn from the JSONL, so it
can be regenerated after the fact (``plot_loss_curve``); it replaces an earlier one atomically
(:mod:`peftlab.checkpoint.atomic`). metrics.jsonl is only ever appended to.

TensorBoard's event file is optional output: when the disk refuses it (full, remounted read-only, permissions),
one warning names the file, the reason and the fix, TensorBoard is off for the rest of the run and training goes
on — a multi-hour run is not lost to its charts. So is an experiment tracker (mlflow, wandb) that fails. A refused write of metrics.jsonl still stops the run
(:mod:`peftlab.trainer.failures`). The event file is written in the calling thread (:class:`EventFile`):
torch's ``SummaryWriter`` writes from a background thread that dies with a raw traceback on a refused write and
re-raises it at the next call, with the file name as bytes or none at all.
"""
from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

from peftlab.checkpoint.atomic import atomic_write
from peftlab.checkpoint.store import storage_problem

logger = logging.getLogger(__name__)


class RunLog:
    """Where a run's figures go: metrics.jsonl, TensorBoard and the experiment trackers of ``report_to``;
    ``enabled=False`` (ranks other than 0) writes nothing."""

    def __init__(self, out_dir: Path, report_to: list[str], *, enabled: bool = True,
                 params: dict[str, Any] | None = None, run_name: str | None = None, resumed_step: int | None = None):
        """``params`` (the recipe) and ``run_name`` go to the experiment trackers (mlflow, wandb) of
        ``report_to``; see :mod:`peftlab.metrics.trackers`. ``resumed_step``: the checkpoint's step a resumed run
        continues from (TensorBoard then drops what the interrupted run logged after it)."""
        self.out_dir = out_dir
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self._jsonl = enabled and "jsonl" in report_to
        self._tb: EventFile | None = None
        if enabled and "tensorboard" in report_to:
            try:
                self._tb = EventFile(out_dir / "tensorboard", resumed_step)
            except OSError as exc:
                self._tensorboard_off(exc, out_dir / "tensorboard", "at the start")
        self._trackers: list[Any] = []
        if enabled and any(name in report_to for name in ("mlflow", "wandb")):
            from peftlab.metrics.trackers import build_trackers

            self._trackers = build_trackers(out_dir, report_to, params=params, run_name=run_name)

    def log(self, step: int, split: str, figures: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, **{k: v for k, v in figures.items() if _jsonable(v)}}
        if self._jsonl:
            append_line(self.path, json.dumps(record))
        if self._tb is not None:
            scalars = {f"{split}/{k}": float(v) for k, v in figures.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
            try:
                self._tb.add_scalars(step, scalars)
            except OSError as exc:
                tb, self._tb = self._tb, None
                with contextlib.suppress(OSError):  # the buffered bytes fail again; the descriptor is closed anyway
                    tb.close()
                self._tensorboard_off(exc, tb.path, f"at step {step}", f" (TensorBoard holds the steps before {step})")
        self._each_tracker("log", step, split, figures, when=f"at step {step}")

    def log_artifact(self, path: Path, name: str) -> None:
        """Hand a file or directory (the adapter, metrics.jsonl) to the experiment trackers."""
        self._each_tracker("log_artifact", path, name, when=f"storing {path.name}")

    def close(self) -> None:
        if self._tb is not None:
            tb, self._tb = self._tb, None
            try:
                tb.close()
            except OSError as exc:
                self._tensorboard_off(exc, tb.path, "at the end")
        self._each_tracker("close", when="at the end")
        self._trackers = []

    def _each_tracker(self, call: str, *args: Any, when: str) -> None:
        """``call`` on every experiment tracker. A tracker is optional output like TensorBoard: one that fails (its
        store locked by a reader such as ``mlflow ui``, or full; a lost service) is dropped with one warning, its
        run ended as failed (it stops at that step), and the run goes on; metrics.jsonl keeps every record."""
        for tracker in list(self._trackers):
            try:
                getattr(tracker, call)(*args)
            except Exception as exc:  # noqa: BLE001 - any library's error (MlflowException, sqlalchemy's, wandb's)
                self._trackers.remove(tracker)
                if call != "close":
                    _end_as_failed(tracker)
                detail = (str(exc).strip().splitlines() or [""])[0][:300]
                logger.warning(f"{_tracker_name(tracker)} reporting is off for the rest of this run: {call} failed "
                               f"{when} ({type(exc).__name__}: {detail}); training goes on; {self._still_written()} "
                               "written as before")

    def _tensorboard_off(self, exc: OSError, path: Path, when: str, kept: str = "") -> None:
        """The one warning of a run whose TensorBoard output the disk refused (the caller stops writing it)."""
        why, fix = storage_problem(exc)
        if exc.errno == errno.EEXIST:  # mkdir of the tensorboard folder where a file of that name is
            fix = "a file is in the way of that directory: move it away"
        code = errno.errorcode.get(exc.errno, exc.errno) if exc.errno else type(exc).__name__
        logger.warning(f"TensorBoard logging is off for the rest of this run: could not write {path} {when}: {why} "
                       f"(errno {code}); {fix}; training goes on; {self._still_written()} written as before{kept}")

    def _still_written(self) -> str:
        return "metrics.jsonl, checkpoints and the adapter are" if self._jsonl else "checkpoints and the adapter are"


def _end_as_failed(tracker: Any) -> None:
    """End a dropped tracker's run as failed (MLflow status ``FAILED``, W&B exit code 1), if it still can: its
    records stop at the failure, and ``close()`` would mark the run finished as if it held the whole run. The
    failure watch's closer for it goes too (:meth:`peftlab.metrics.trackers._WatchedRun.failed`)."""
    with contextlib.suppress(Exception):  # the store that just failed may refuse this too; the warning says why
        tracker.failed()


def _tracker_name(tracker: Any) -> str:
    from peftlab.metrics.trackers import TRACKERS

    return next((name for name, cls in TRACKERS.items() if isinstance(tracker, cls)), type(tracker).__name__)


_event_file_ids = itertools.count()


class EventFile:
    """One TensorBoard event file (TFRecord-framed ``Event`` protos, the format ``SummaryWriter`` writes and
    TensorBoard reads), written and flushed in the calling thread, so a refused write raises here as an OSError."""

    def __init__(self, log_dir: Path, resumed_step: int | None = None):
        """``resumed_step``: a resumed run's checkpoint step. The file then starts with a session START at the next
        step, which makes TensorBoard purge the events of the interrupted run from that step on (its steps after
        the checkpoint, which the resumed run logs again), so the curves do not overlap."""
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.summary.writer.record_writer import RecordWriter

        log_dir.mkdir(parents=True, exist_ok=True)
        # TensorBoard finds event files by this name pattern; pid and a counter keep two writers apart
        self.path = log_dir / (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                               f"{os.getpid()}.{next(_event_file_ids)}")
        self._file = open(self.path, "wb")  # noqa: SIM115 (held open for the run; closed by close())
        self._records = RecordWriter(self._file)
        try:
            self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))
            if resumed_step is not None:
                self._write(Event(wall_time=time.time(), step=resumed_step + 1,
                                  session_log=SessionLog(status=SessionLog.START)))
        except OSError:
            with contextlib.suppress(OSError):
                self._file.close()
            raise

    def add_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """One event holding ``scalars`` (tag -> value) at ``step``, flushed to the OS."""
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        if scalars:
            values = [Summary.Value(tag=tag, simple_value=v) for tag, v in scalars.items()]
            self._write(Event(wall_time=time.time(), step=step, summary=Summary(value=values)))

    def _write(self, event: Any) -> None:
        self._records.write(event.SerializeToString())
        self._file.flush()

    def close(self) -> None:
        self._file.close()



def append_line(path: Path, line: str) -> None:
    """Append one line to ``path``. A refused write (read-only or full disk, permissions) raises its
    OSError with ``filename`` set — a failed ``write`` has none of its own — so the trainer can name the file."""
    try:
        with path.open("a") as f:
            f.write(line + "\n")
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
    except (TypeError, ValueError):
        return False
    return True


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (none when it does not exist)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics_path: Path, out_png: Path) -> Path | None:
    """Train loss (and eval loss / exact match / a preference run's eval reward accuracy when present) against
    optimizer step."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("split") == "train" and "loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(*zip(*train), label="train loss", color="tab:blue")
    ev = [(r["step"], r["eval_loss"]) for r in records if r.get("split") == "eval" and "eval_loss" in r]
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per target token)")
    em = [(r["step"], r["exact_match"]) for r in records if r.get("split") == "eval" and "exact_match" in r]
    # preference runs: how often the chosen answer out-scores the rejected one on held-out pairs
    acc = [(r["step"], r["eval_rewards/accuracies"]) for r in records
           if r.get("split") == "eval" and "eval_rewards/accuracies" in r]
    if em or acc:
        ax2 = ax.twinx()
        if em:
            ax2.plot(*zip(*em), "s--", color="tab:green", label="exact match")
        if acc:
            ax2.plot(*zip(*acc), "^:", color="tab:red", label="eval rewards/accuracies")
        ax2.set_ylabel("exact match" if not acc else "exact match / reward accuracy" if em else "reward accuracy")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="upper center")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return out_png
