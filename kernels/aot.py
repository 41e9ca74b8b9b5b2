"""Ahead-of-time compilation of Triton kernels for real NVIDIA GPUs, on a machine without one.

Triton ships ``ptxas``, so ``triton.compile`` can lower a kernel all the way to a cubin for any
``sm_XX`` here. Kernel tests use this to prove that every kernel compiles with the launch
configurations (block sizes, warps, stages) that the dispatch really uses for realistic shapes, and to
report registers and spills — the numbers that decide whether a block size is too big.

Registers/spills: the compiled kernel's ``n_regs``/``n_spills`` are only filled in when the cubin is
loaded on a device, so we re-run ``ptxas -v`` on the generated PTX and parse its resource report.

``TRITON_INTERPRET=1`` (set by the test suite) turns every ``@triton.jit`` into an interpreter object,
including helper functions the kernel calls. When it is set, :func:`compile_kernel` re-imports the
kernel in a subprocess without the variable, so callers never need to care.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any

ARCHS: tuple[int, ...] = (80, 89, 90)  # A100, L4/L40/RTX 4090, H100/H200


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """Resources of one kernel compiled for one architecture with one launch configuration."""

    arch: int
    n_regs: int  # registers per thread
    n_spills: int  # spilled 32-bit words per thread (spill store bytes / 4, as the CUDA driver counts)
    shared_bytes: int  # static shared memory Triton allocates for the kernel
    cubin_size: int  # bytes of the cubin
    name: str = ""
    num_warps: int = 4
    num_stages: int = 3
    spill_store_bytes: int = 0
    spill_load_bytes: int = 0
    constexprs: str = ""  # the constexpr values compiled, for the printed table

    def row(self) -> str:
        return (f"{self.name:<36} sm_{self.arch:<3} warps={self.num_warps:<2} stages={self.num_stages} "
                f"regs={self.n_regs:<4} spills={self.n_spills:<4} smem={self.shared_bytes:<6} "
                f"cubin={self.cubin_size:<7} {self.constexprs}")


_PTXAS_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS_RE = re.compile(r"Used (\d+) registers")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _python_fn(fn: Any) -> Any:
    """The plain Python function behind a JITFunction / InterpretedFunction / autotuner / heuristics."""
    while hasattr(fn, "fn"):
        fn = fn.fn
    return fn


def _ptxas_resources(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v`` on ``ptx``."""
    from triton.backends.nvidia.compiler import get_ptxas

    target = re.search(r"^\.target\s+(\S+)", ptx, re.MULTILINE)
    gpu_name = target.group(1).rstrip(",") if target else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run(
            [get_ptxas(arch).path, "-v", f"--gpu-name={gpu_name}", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True, text=True, check=True,
        )
    log = proc.stdout + proc.stderr
    regs = _REGS_RE.search(log)
    spills = _PTXAS_RE.search(log)
    if regs is None or spills is None:
        raise RuntimeError(f"could not parse ptxas -v output:\n{log}")
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


def _compile_in_process(fn: Any, signature: dict[str, str], constexprs: dict[str, object], arch: int,
                        num_warps: int, num_stages: int) -> CompileReport:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    jit_fn = JITFunction(_python_fn(fn))
    # constexpr arguments must appear in the signature as "constexpr".
    full_sig = {name: ("constexpr" if name in constexprs else signature[name]) for name in jit_fn.arg_names}
    src = triton.compiler.ASTSource(fn=jit_fn, signature=full_sig, constexprs=dict(constexprs))
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    regs, st, ld = _ptxas_resources(compiled.asm["ptx"], arch)
    return CompileReport(arch=arch, n_regs=regs, n_spills=st // 4, shared_bytes=int(compiled.metadata.shared),
                         cubin_size=len(compiled.asm["cubin"]), name=jit_fn.__name__, num_warps=num_warps,
                         num_stages=num_stages, spill_store_bytes=st, spill_load_bytes=ld,
                         constexprs=" ".join(f"{k}={v}" for k, v in constexprs.items()))


def compile_kernel(fn: Any, signature: dict[str, str], constexprs: dict[str, object], arch: int,
                   num_warps: int = 4, num_stages: int = 3) -> CompileReport:
    """Compile ``fn`` (a ``@triton.jit`` kernel) to a cubin for ``sm_<arch>`` and report its resources.

    ``signature`` maps each runtime argument name to its Triton type (``"*fp32"``, ``"*bf16"``,
    ``"i32"``, ``"i64"``, ``"fp32"``...); ``constexprs`` maps each ``tl.constexpr`` argument to its
    value (block sizes, flags). Raises whatever Triton/ptxas raise when the kernel does not compile.
    """
    return compile_kernels([(fn, signature, constexprs, arch, num_warps, num_stages)])[0]


def compile_kernels(jobs: list[tuple[Any, dict[str, str], dict[str, object], int, int, int]]) -> list[CompileReport]:
    """Batch form of :func:`compile_kernel`: ``jobs`` are ``(fn, signature, constexprs, arch, num_warps,
    num_stages)``; under TRITON_INTERPRET all of them compile in ONE subprocess (start-up is the cost)."""
    if not _interpreting():
        return [_compile_in_process(*job) for job in jobs]
    payload = []
    for fn, signature, constexprs, arch, num_warps, num_stages in jobs:
        py_fn = _python_fn(fn)
        payload.append({"module": py_fn.__module__, "name": py_fn.__qualname__, "signature": signature,
                        "constexprs": constexprs, "arch": arch, "num_warps": num_warps,
                        "num_stages": num_stages})
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # kernels defined in test modules must be importable by the child too
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc = subprocess.run([sys.executable, "-m", "peftlab.kernels.aot", json.dumps(payload)],
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        names = sorted({f"{j['name']}@sm_{j['arch']}" for j in payload})
        raise RuntimeError(f"AOT compile failed for {names}:\n{proc.stderr[-6000:]}")
    return [CompileReport(**r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]


def compile_table(reports: list[CompileReport]) -> str:
    """A printable table of reports (one line each)."""
    return "\n".join(r.row() for r in reports)


def assert_compiles(launches: list[tuple[Any, dict[str, str], dict[str, object], int, int]], *,
                    archs: tuple[int, ...] = ARCHS, capsys: Any = None) -> list[CompileReport]:
    """Pytest helper: compile every launch ``(fn, signature, constexprs, num_warps, num_stages)`` for
    every arch, check each report is well-formed, and print the registers/spills table.

    Pass pytest's ``capsys`` to print the table even when output is captured.
    """
    jobs = [(fn, sig, cx, arch, nw, ns) for fn, sig, cx, nw, ns in launches for arch in archs]
    reports = compile_kernels(jobs)
    for r in reports:
        assert isinstance(r.n_regs, int) and 0 < r.n_regs <= 255, r
        assert isinstance(r.n_spills, int) and r.n_spills >= 0, r
        assert r.cubin_size > 0, r
    text = compile_table(reports)
    if capsys is not None:
        with capsys.disabled():
            print("\n" + text)
    else:
        print(text)
    return reports


def _main(payload: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def one(req: dict) -> dict:
        obj: Any = importlib.import_module(req["module"])
        for part in req["name"].split("."):
            obj = getattr(obj, part)
        return dataclasses.asdict(_compile_in_process(
            obj, req["signature"], req["constexprs"], req["arch"], req["num_warps"], req["num_stages"]))

    # ptxas runs as a subprocess: two compiles in flight keep both cores of a CI machine busy
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        reports = list(pool.map(one, json.loads(payload)))
    print(json.dumps(reports))


if __name__ == "__main__":
    _main(sys.argv[1])
