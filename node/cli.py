"""``atom-node``: join a coordinator and contribute this machine's GPU (or CPU)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from rich.console import Console
from rich.table import Table

from protocol.cli_app import CliApp
from protocol.cli_errors import one_line_errors
from protocol.errors import ConfigError, EnrollmentError
from protocol.invite import InviteToken
from protocol.metrics import parse_address

from .credits import CreditReport, credits_report
from .receipt_proofs import ProofReport, proofs_report
from .enroll import enroll
from .gpu import NvmlProbe, cuda_index, gpu_count, load_nvml
from .identity import NodeHome, default_home
from .policy import Policy
from .supervisor import COMPILE_MODES, Supervisor, check_installed

__all__ = ["app", "main"]

app = CliApp(add_completion=False, no_args_is_help=True,
             help="Contribute compute to an ATOM Network training run.")
console = Console(stderr=True)

HomeOpt = Annotated[Optional[Path], typer.Option(
    "--home", help="where the node keeps its key and enrollment [default: ~/.atom-node]")]


@app.command()
@one_line_errors
def join(
    coordinator: Annotated[Optional[str], typer.Argument(
        help="coordinator address HOST:PORT [default: the one in the token, or the one this "
             "node enrolled with]")] = None,
    token: Annotated[Optional[str], typer.Option(help="invite token from the coordinator")] = None,
    name: Annotated[Optional[str], typer.Option(help="node name [default: hostname]")] = None,
    home: HomeOpt = None,
    threads: Annotated[int, typer.Option(help="CPU threads for torch (0 = all)")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    gpus: Annotated[str, typer.Option(
        help="train each lease data-parallel over N GPUs (or all of them), the batch split "
             "between them", metavar="N|all")] = "1",
    activation_checkpointing: Annotated[bool, typer.Option(
        "--activation-checkpointing", help="recompute activations in the backward pass: "
        "less GPU memory for large models, about a third more compute")] = False,
    compile_mode: Annotated[str, typer.Option(
        "--compile", help="torch.compile the model once per worker: auto (on CUDA only), on "
        "or off", click_type=click.Choice(COMPILE_MODES, case_sensitive=False))] = "auto",
    sign_key: Annotated[Optional[Path], typer.Option(hidden=True)] = None,
    slowdown: Annotated[float, typer.Option(
        min=1.0, hidden=True, help="benchmarks: take F times as long for each lease (waits "
                                   "after the work), to play a slower device")] = 1.0,
    metrics: Annotated[str, typer.Option(
        help='HOST:PORT of this node\'s Prometheus /metrics ("" = off)',
        metavar="HOST:PORT")] = "127.0.0.1:9095",
    policy: Annotated[Optional[Path], typer.Option(
        help="contribution policy (TOML): time windows, pause when the GPU is busy, GPU "
             "memory cap (docs/operations.md)", metavar="FILE")] = None,
    window: Annotated[Optional[list[str]], typer.Option(
        help='work only then, local time, e.g. "Mon-Fri 19:00-07:00" (repeatable; '
             "replaces the policy file's)", metavar="WHEN")] = None,
    pause_when_gpu_busy: Annotated[bool, typer.Option(
        "--pause-when-gpu-busy", help="hand work back while another process uses the GPU "
                                      "(needs nvidia-ml-py)")] = False,
    max_gpu_memory: Annotated[Optional[str], typer.Option(
        help='GPU memory this node may use, e.g. "40GiB"', metavar="SIZE")] = None,
) -> None:
    """Enroll with a coordinator (first time) and keep working for it until Ctrl-C.
    SIGTERM or SIGUSR1 hands the lease in flight back and exits 0 (batch jobs)."""
    if metrics:
        parse_address(metrics, "--metrics")  # a typo is one line, before anything starts
    rules = _policy(policy, window or [], pause_when_gpu_busy, max_gpu_memory, device)
    n_gpus = gpu_count(gpus, device)
    check_installed()
    node_home = NodeHome((home or default_home()).expanduser().resolve())
    enrollment = node_home.enrollment()
    address = _address(coordinator, token, enrollment.coordinator_address if enrollment else None)
    if enrollment is None or (token and enrollment.coordinator_address != address):
        if not token:
            raise EnrollmentError("this node is not enrolled yet: pass --token <invite>")
        enrollment = enroll(address, token, node_home, name or socket.gethostname())
        console.print(f"enrolled as node {enrollment.node_id} for {enrollment.institution} "
                      f"(run {enrollment.run_id})", style="green")
    else:
        console.print(f"node {enrollment.node_id} ({enrollment.institution}) rejoining "
                      f"run {enrollment.run_id}", style="green")
    policy_file = None
    if rules != Policy():
        console.print(f"policy: {rules.describe()}", highlight=False)
        policy_file = _write_policy(node_home, rules)
    Supervisor(node_home, enrollment, threads=threads, device=device, gpus=n_gpus,
               checkpointing=activation_checkpointing, compile_mode=compile_mode.lower(),
               sign_key=sign_key, slowdown=slowdown,
               metrics_address=metrics, console=console, policy=policy_file).run()


def _policy(file: Path | None, windows: list[str], pause_when_gpu_busy: bool,
            max_gpu_memory: str | None, device: str) -> Policy:
    """The policy of ``--policy`` with the flags on top, checked (NVML included) before
    anything else happens: a typo must not cost an invite token."""
    rules = Policy()
    if file is not None:
        try:
            text = file.expanduser().read_text()
        except OSError as err:
            raise ConfigError(f"--policy {file}: {err.strerror or err}") from None
        rules = Policy.from_toml(text, str(file))
    rules = rules.with_flags(windows, pause_when_gpu_busy, max_gpu_memory)
    if rules.pause_when_gpu_busy:
        index = cuda_index(device)  # a GPU to watch, then NVML that answers and knows it
        NvmlProbe(load_nvml(), index)
    return rules


def _write_policy(home: NodeHome, rules: Policy) -> Path:
    """Where the worker reads the policy from (``node.client_app.lease_gate``)."""
    home.path.mkdir(parents=True, exist_ok=True)
    path = home.path / "policy.json"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(rules.to_dict(), indent=2))
    tmp.replace(path)
    return path


def _address(given: str | None, token: str | None, enrolled: str | None) -> str:
    """The coordinator to talk to: as given, else the invite token's, else the enrollment's.
    A given address that differs from the token's wins (it may be another name for the same
    machine; the token's CA pin still checks it is the right coordinator), with a warning."""
    in_token = InviteToken.decode(token).address if token else None  # one-line error if bad
    if given and in_token and given != in_token:
        console.print(f"warning: using {given}, not {in_token} from the invite token",
                      style="yellow", soft_wrap=True, highlight=False)
    address = given or in_token or enrolled
    if address is None:
        raise EnrollmentError("this node is not enrolled yet: pass --token <invite>")
    return address


@app.command()
@one_line_errors
def whoami(home: HomeOpt = None) -> None:
    """Show this node's enrollment."""
    node_home = NodeHome((home or default_home()).expanduser().resolve())
    e = node_home.enrollment()
    if e is None:
        raise EnrollmentError(f"no enrollment in {node_home.path}")
    console.print_json(data=e.__dict__)


def _credits_table(report: CreditReport) -> Table:
    table = Table(title=f"credits of node {report.node_id}",
                  caption=f"{report.receipts_verified} receipts verified with coordinator "
                          f"key {report.coordinator_key_fingerprint}")
    for name in ("run", "work", "updates", "tokens", "credits"):
        table.add_column(name, justify="left" if name in ("run", "work") else "right")
    for run, total in report.runs.items():
        for line in (x for x in report.lines if x.run_id == run):
            table.add_row(run, line.kind, str(line.updates), f"{line.tokens:,}",
                          f"{line.credits:,.4f}")
        if len(report.runs) > 1:
            table.add_row(run, "all", str(total.updates), "", f"{total.credits:,.4f}",
                          style="dim")
    t = report.total
    table.add_row("total", "", str(t.updates),
                  f"{t.tokens_trained:,} trained, {t.tokens_evaluated:,} evaluated",
                  f"{t.credits:,.4f}", style="bold", end_section=True)
    if t.penalties:  # say why the total is below what the work earned
        table.caption += (f"; {t.penalties} update(s) lost a spot or eval check and were charged "
                          "(work: penalty)")
    return table


def _proofs_table(report: ProofReport) -> Table:
    table = Table(title=f"receipts of node {report.node_id} in the receipt tree",
                  caption=f"{len(report.lines)} receipts proven in the tree of "
                          f"{report.tree_size} receipts (run {report.run_id}), signed with "
                          f"coordinator key {report.coordinator_key_fingerprint}")
    for name in ("update", "run", "work", "round", "credits", "leaf", "ok"):
        table.add_column(name, justify="left" if name in ("run", "work", "ok") else "right")
    for line in report.lines:
        table.add_row(str(line.update_id), line.run_id, line.kind, str(line.round),
                      f"{line.credits:,.4f}", str(line.leaf_index), "ok" if line.ok else "BAD")
    return table


@app.command()
@one_line_errors
def credits(
    home: HomeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the totals as JSON")] = False,
    verify_only: Annotated[Optional[Path], typer.Option(
        "--verify-only", help="check an exported statement FILE offline", metavar="FILE")]
    = None,
    coordinator_key: Annotated[Optional[Path], typer.Option(
        help="verify with this PEM instead of the key pinned at join", metavar="PEM")] = None,
    save: Annotated[Optional[Path], typer.Option(
        help="write the verified statement to FILE", metavar="FILE")] = None,
    proof: Annotated[bool, typer.Option(
        "--proof", help="check instead that every receipt is in the coordinator's signed "
                        "Merkle tree of all receipts (inclusion proofs)")] = False,
    root: Annotated[Optional[str], typer.Option(
        help="with --proof: the tree root the proofs must lead to, e.g. the one a model card "
             "prints (implies --proof)", metavar="HEX")] = None,
) -> None:
    """Show what this node earned: every receipt verified against the coordinator's key."""
    node_home = NodeHome((home or default_home()).expanduser().resolve())
    if proof or root is not None:
        if verify_only is not None or save is not None:
            raise ConfigError("--proof asks the coordinator for its current tree: it cannot be "
                              "combined with --verify-only or --save")
        proofs = proofs_report(node_home, key_file=coordinator_key, root=root)
        if as_json:
            print(json.dumps(proofs.to_dict(), indent=2))
        else:
            out = Console()
            out.print(_proofs_table(proofs))
            out.print(f"tree root {proofs.root}", soft_wrap=True)  # whole, to compare by eye
        return
    report = credits_report(node_home, statement_file=verify_only, key_file=coordinator_key,
                            save=save)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        Console().print(_credits_table(report))


def main() -> None:
    app()
