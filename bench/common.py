"""Tiny shared helpers for the benchmarks in bench/ (not a test dependency, not a framework).

- :func:`environment` — device, library versions, git commit and the command line, attached to every
  result so a figure in RESULTS.md can be traced to what produced it.
- :func:`append_jsonl` — append one result record (plus :func:`environment`) to
  ``bench/results/<name>.jsonl``.
- :func:`median_time_ms` — median wall time of a callable (CPU; on CUDA it synchronises).
- :func:`watch` — wait for a benchmark subprocess, killing it past a memory limit or a timeout.
- :func:`run_peak_rss` — run a Python snippet in a fresh subprocess and return its own peak resident
  set (VmHWM, see ``peftlab.engine.planner.peak_rss_bytes``: a child's ``ru_maxrss`` starts at its parent's
  size): the only honest way to compare the peak memory of two methods on CPU.

Keep this API stable: several benchmarks import it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """Short commit of the checkout (with ``-dirty`` when the working tree has changes), or "unknown"."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True,
            text=True, check=True,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


_START_COMMIT = git_commit()


def device_name() -> str:
    """"cuda:<GPU name>" when CUDA is available, else "cpu:<processor> x<cores>"."""
    import torch

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name()}"
    proc = platform.processor() or platform.machine()
    return f"cpu:{proc} x{os.cpu_count()}"


def environment() -> dict[str, Any]:
    """Everything needed to reproduce a figure: device, versions, git commit, command line, time."""
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    return {
        "device": device_name(),
        "versions": versions,
        "git_commit": _START_COMMIT,  # the code the benchmark started with, not HEAD at the time of writing
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
    }


def append_jsonl(name: str, record: dict[str, Any], results_dir: Path | None = None) -> Path:
    """Append ``record`` merged with :func:`environment` as one JSON line to ``<results_dir>/<name>.jsonl``."""
    out_dir = Path(results_dir) if results_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.jsonl"
    with path.open("a") as f:
        f.write(json.dumps({**environment(), **record}, default=str) + "\n")
    return path


def median_time_ms(fn: Callable[[], Any], *, warmup: int = 1, iters: int = 5) -> float:
    """Median wall-clock milliseconds of ``fn()`` over ``iters`` runs after ``warmup`` runs."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(max(1, iters)):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


_RSS_RUNNER = r"""
import json, sys
from peftlab.engine.planner import peak_rss_bytes
baseline = peak_rss_bytes()
ns = {}
exec(compile(sys.argv[1], "<bench snippet>", "exec"), ns)
peak = peak_rss_bytes()
print("__PEAK_RSS__" + json.dumps({"peak_rss_kb": peak / 1024, "baseline_rss_kb": baseline / 1024,
                                   "result": ns.get("RESULT")}, default=str))
"""


def run_peak_rss(snippet: str, *, timeout: float = 1800.0, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``snippet`` (Python source) in a fresh interpreter and report its peak RSS.

    Returns ``{"peak_rss_mb", "baseline_rss_mb", "result"}`` where ``baseline`` is the RSS right after
    interpreter start-up and ``result`` is whatever the snippet stored in a global ``RESULT`` (must be
    JSON-serialisable). Put imports and setup in the snippet; measure by difference between two
    snippets that share the same setup (e.g. inputs only vs inputs + method) when you need the
    method's own share. Raises RuntimeError with the child's stderr when it fails.
    """
    proc = subprocess.run(
        [sys.executable, "-P", "-c", _RSS_RUNNER, snippet], check=False, capture_output=True, text=True,
        timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO_ROOT,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("__PEAK_RSS__")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"benchmark subprocess failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    data = json.loads(line[len("__PEAK_RSS__"):])
    return {
        "peak_rss_mb": data["peak_rss_kb"] / 1024.0,
        "baseline_rss_mb": data["baseline_rss_kb"] / 1024.0,
        "result": data["result"],
    }


def watch(proc: subprocess.Popen, *, max_rss_gb: float, timeout_s: float) -> dict[str, Any]:
    """Wait for ``proc`` while sampling its memory every 0.2 s; kill it when its anonymous resident
    memory (RSS minus file-backed pages such as memory-mapped checkpoint shards, which the kernel can
    drop) passes ``max_rss_gb`` GiB or it runs longer than ``timeout_s``. Returns ``{"status": "ok" |
    "exceeded N GB" | "timeout N s", "sampled_rss_gb", "sampled_anon_gb"}`` (sampled maxima, GiB)."""
    import psutil

    ps = psutil.Process(proc.pid)
    status, rss_max, anon_max = "ok", 0, 0
    start = time.perf_counter()
    while proc.poll() is None:
        try:
            info = ps.memory_info()
        except psutil.Error:
            break
        rss_max, anon_max = max(rss_max, info.rss), max(anon_max, info.rss - info.shared)
        if info.rss - info.shared > max_rss_gb * 2**30:
            status = f"exceeded {max_rss_gb:g} GB"
            proc.kill()
        elif time.perf_counter() - start > timeout_s:
            status = f"timeout {timeout_s:g} s"
            proc.kill()
        time.sleep(0.2)
    proc.wait()
    return {"status": status, "sampled_rss_gb": rss_max / 2**30, "sampled_anon_gb": anon_max / 2**30}


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Print ``rows`` as an aligned plain-text table with the given column order."""
    cells = [[c for c in columns]] + [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for j, row in enumerate(cells):
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return "" if v is None else str(v)


def measure_op(name: str, args: argparse.Namespace, step: Callable[[], Any], iters: int, method: str,
               shape: dict[str, Any], max_diff: float) -> dict[str, Any]:
    """One row of an op benchmark: ``step`` (one forward+backward) timed, its peak allocation above what was live
    before it (MiB, on the GPU), which backend ran (Triton for peftlab under ``--gpu``); appended to ``name``'s
    JSON lines."""
    import torch

    peak = None
    if args.gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = median_time_ms(step, warmup=0 if args.smoke else 2, iters=iters)
    row = {**shape, "method": method, "backend": "triton" if (args.gpu and method == "peftlab") else "torch",
           "fwd_bwd_ms": ms, "peak_MiB": peak, "max_abs_diff": max_diff}
    append_jsonl(name, row, results_dir=args.results_dir)
    return row


def run_op_bench(doc: str | None, one_shape: Callable[..., list[dict[str, Any]]], *, smoke_shape: tuple,
                 shapes_cpu: list[tuple], shapes_gpu: list[tuple], columns: list[str],
                 argv: list[str] | None = None) -> list[dict[str, Any]]:
    """The command line of an op benchmark (bench_rms_norm / rope / swiglu): ``--gpu`` (bf16 on CUDA, Triton) or
    the CPU (fp32, the PyTorch path), ``--smoke`` (one tiny shape, one iteration), ``--results-dir``;
    ``one_shape(args, device, dtype, iters, *shape)`` measures one shape; one table is printed."""
    import torch

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--results-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA")
    device = "cuda" if args.gpu else "cpu"
    dtype = torch.bfloat16 if args.gpu else torch.float32
    shapes = [smoke_shape] if args.smoke else (shapes_gpu if args.gpu else shapes_cpu)
    iters = 1 if args.smoke else (20 if args.gpu else 5)
    rows: list[dict[str, Any]] = []
    for shape in shapes:
        rows += one_shape(args, device, dtype, iters, *shape)
    print(f"device: {device} ({'GPU' if args.gpu else 'CPU figures: PyTorch path, no Triton'})")
    print_table(rows, columns)
    return rows
