"""``peftlab launch``: multi-node (and multi-GPU) runs through the ``deepspeed`` launcher.

Two ways to start a run on the hosts of a DeepSpeed hostfile (``HOST slots=N`` per line):

- from the head node over ssh — DeepSpeed's pdsh / openmpi / mpich / ... runners start every node;
- ``--no-ssh`` — the same command runs on each node with its ``--node-rank`` (clusters without
  passwordless ssh, containers, SLURM: see ``recipes/slurm/peftlab.sbatch``).

Before any model is loaded a preflight checks what usually turns a launch into a silent hang: every
host in the hostfile resolves, and (``--no-ssh``) the master's rendezvous port is reachable and every
node checks in within ``--preflight-timeout`` seconds — otherwise the launch stops and names the node
ranks (and hosts) that are missing. Inside the run, every process again waits at most
``PEFTLAB_JOIN_TIMEOUT`` seconds for the other ranks (:mod:`peftlab.engine.process_group`).
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from peftlab.errors import PeftlabError

logger = logging.getLogger(__name__)

LAUNCHERS = ("pdsh", "openmpi", "mvapich", "mpich", "impi", "slurm")


@dataclass(frozen=True)
class Host:
    name: str
    slots: int
    line: int


def read_hostfile(path: str | Path) -> list[Host]:
    """DeepSpeed's hostfile: ``HOSTNAME slots=N`` per line; ``#`` comments and blank lines ignored."""
    path = Path(path)
    if not path.is_file():
        raise PeftlabError(f"--hostfile {path}: no such file; write one line per node, e.g. 'node-1 slots=8'")
    hosts: list[Host] = []
    for i, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots="):
            raise PeftlabError(f"{path}:{i}: expected 'HOSTNAME slots=N' (e.g. 'node-1 slots=8'), got {raw.strip()!r}")
        try:
            slots = int(parts[1].removeprefix("slots="))
        except ValueError:
            slots = 0
        if slots <= 0:
            raise PeftlabError(f"{path}:{i}: slots must be a positive integer (processes on that node), got {parts[1]!r}")
        if any(h.name == parts[0] for h in hosts):
            raise PeftlabError(f"{path}:{i}: host {parts[0]!r} is listed twice; give each node one line")
        hosts.append(Host(parts[0], slots, i))
    if not hosts:
        raise PeftlabError(f"{path}: no hosts; write one line per node, e.g. 'node-1 slots=8'")
    return hosts


def check_hosts_resolve(hosts: list[Host], hostfile: str | Path) -> None:
    bad = []
    for h in hosts:
        try:
            socket.getaddrinfo(h.name, None)
        except socket.gaierror as exc:
            bad.append(f"{h.name} ({hostfile}:{h.line}: {exc.strerror})")
    if bad:
        raise PeftlabError("preflight: these hosts do not resolve from this node: " + "; ".join(bad)
                           + ". Fix the names in the hostfile or /etc/hosts (or use IP addresses)")


def node_rendezvous(*, node_rank: int, hosts: list[Host], master_addr: str, port: int, timeout_s: float) -> None:
    """Every node checks in on a key-value store served by node rank 0; returns when all have.

    Raises :class:`PeftlabError` naming the missing node ranks (and their hostfile hosts) after
    ``timeout_s`` instead of letting the training processes wait forever on each other.
    """
    import torch.distributed as dist

    n = len(hosts)
    deadline = time.monotonic() + timeout_s
    try:
        store = dist.TCPStore(master_addr, port, n, is_master=node_rank == 0, timeout=timedelta(seconds=timeout_s),
                              wait_for_workers=False)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for an unreachable master
        if node_rank == 0:
            raise PeftlabError(f"preflight: cannot listen on {master_addr}:{port} ({exc}); is the port in use? "
                               "choose another --master-port") from None
        raise PeftlabError(
            f"preflight: node rank {node_rank}: node rank 0 ({hosts[0].name}) is missing — its rendezvous at "
            f"{master_addr}:{port} was not reachable within {timeout_s:.0f}s. Start 'peftlab launch ... "
            "--node-rank 0' on the master node, check --master-addr and that the port is open"
        ) from None
    store.set(f"node/{node_rank}", socket.gethostname())
    missing = list(range(n))
    while missing:
        missing = [r for r in missing if not store.check([f"node/{r}"])]
        if missing and time.monotonic() > deadline:
            who = ", ".join(f"{r} ({hosts[r].name})" for r in missing)
            raise PeftlabError(
                f"preflight: node rank(s) {who} did not join within {timeout_s:.0f}s (master {master_addr}:{port}); "
                "start 'peftlab launch ... --no-ssh --node-rank N' on every node of the hostfile, or raise "
                "--preflight-timeout"
            )
        time.sleep(0.05)
    # Node 0 serves the store: it leaves only when every node has seen the full roll call.
    store.set(f"seen/{node_rank}", "1")
    if node_rank == 0:
        while any(not store.check([f"seen/{r}"]) for r in range(n)) and time.monotonic() < deadline + 30:
            time.sleep(0.05)


def deepspeed_command(recipe: str, *, hostfile: str, no_ssh: bool, node_rank: int, nproc_per_node: int | None,
                      master_addr: str, master_port: int, launcher: str, overrides: list[str]) -> list[str]:
    """The ``deepspeed`` launcher command that starts ``peftlab train RECIPE`` on every process."""
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--hostfile", hostfile,
           "--master_addr", master_addr, "--master_port", str(master_port), "--no_local_rank", "--module"]
    if nproc_per_node:
        cmd += ["--num_gpus", str(nproc_per_node)]
    if no_ssh:
        cmd += ["--no_ssh", "--node_rank", str(node_rank)]
    else:
        cmd += ["--launcher", launcher]
    cmd += ["peftlab.cli.main", "train", recipe]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def launch(recipe: str, *, hostfile: str, no_ssh: bool = False, node_rank: int | None = None,
           nproc_per_node: int | None = None, master_addr: str | None = None, master_port: int = 29500,
           launcher: str = "pdsh", preflight_timeout: float = 120.0, overrides: list[str] | None = None) -> int:
    """Preflight, then run the deepspeed launcher; returns its exit status."""
    from peftlab.recipe.parse import load_recipe

    overrides = overrides or []
    r = load_recipe(recipe, overrides=overrides)  # a broken recipe fails here, on every node, at once
    if r.deepspeed is None:
        raise PeftlabError(f"{recipe}: the recipe has no 'deepspeed' key; add e.g. 'deepspeed: "
                           "zero2' (the shipped ZeRO-2 config) to train across processes")
    hosts = read_hostfile(hostfile)
    check_hosts_resolve(hosts, hostfile)
    if nproc_per_node is not None and nproc_per_node <= 0:
        raise PeftlabError(f"--nproc-per-node {nproc_per_node}: expected a positive number of processes")
    if no_ssh:
        if node_rank is None or not 0 <= node_rank < len(hosts):
            raise PeftlabError(f"--no-ssh needs --node-rank between 0 and {len(hosts) - 1} (the line of this node "
                               f"in {hostfile}, counted from 0)")
        master_addr = master_addr or hosts[0].name
        node_rendezvous(node_rank=node_rank, hosts=hosts, master_addr=master_addr, port=master_port + 1,
                        timeout_s=preflight_timeout)
    else:
        if launcher not in LAUNCHERS:
            raise PeftlabError(f"--launcher {launcher}: expected one of {', '.join(LAUNCHERS)}")
        backend = {"pdsh": "pdsh", "openmpi": "mpirun", "mpich": "mpirun", "mvapich": "mpirun", "impi": "mpirun",
                   "slurm": "srun"}[launcher]
        if len(hosts) > 1 and shutil.which(backend) is None:
            raise PeftlabError(f"--launcher {launcher} needs '{backend}' on PATH on the head node; install it, pick "
                               "another --launcher, or run with --no-ssh --node-rank N on each node")
        master_addr = master_addr or hosts[0].name
    env = dict(os.environ)
    # `python -m` puts the working directory first on sys.path; the repo's top-level kernels/ folder must
    # not shadow the third-party `kernels` module bitsandbytes imports (DESIGN.md, layout).
    env["PYTHONSAFEPATH"] = "1"
    env.setdefault("PEFTLAB_JOIN_TIMEOUT", str(int(preflight_timeout)))
    cmd = deepspeed_command(recipe, hostfile=hostfile, no_ssh=no_ssh, node_rank=node_rank or 0,
                            nproc_per_node=nproc_per_node, master_addr=master_addr, master_port=master_port,
                            launcher=launcher, overrides=overrides)
    logger.info("peftlab launch: %s", " ".join(cmd))
    return subprocess.call(cmd, env=env)
