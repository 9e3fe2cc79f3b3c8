"""``atom-coordinator``: define a run, invite institutions, run it, or run the local demo."""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import click
import typer
from rich.console import Console

from protocol.cli_app import CliApp
from protocol.cli_errors import one_line_errors
from protocol.errors import AtomError, ConfigError
from training.families import FAMILIES

from coordinator.ledger.engine import shown_url
from coordinator.rundir import RunDir, create_invite, init_run

if TYPE_CHECKING:
    from rich.progress import TaskID

# `start` and `demo` import the training stack (torch) inside the command, so that
# `init` and `invite` answer in well under a second.

__all__ = ["app", "main"]

app = CliApp(add_completion=False, no_args_is_help=True,
             help="Coordinate an ATOM Network training run.")
err = Console(stderr=True)

DirArg = Annotated[Path, typer.Argument(help="run directory")]
# `demo --family llama|qwen2|gpt2`: a BPE vocabulary small enough for a fast CPU demo, and
# leases as long as the GPT demo's: a step of their tiny presets on 2048 tokens took 91-98 ms
# against the byte-level GPT's 58 ms (1 thread, 8 x 128 tokens, 2026-12-03), so 0.6 x its
# 240 steps (each BPE token holds ~3-4 bytes of text: still more text per lease)
DEMO_BPE_VOCAB = 2048
DEMO_BPE_INNER_STEPS = 144


def say_command(text: str) -> None:
    """A hint holding a command, on stderr, never wrapped: rich wraps at 80 columns when
    stderr is no terminal, which breaks copy-paste and ``grep`` in logs."""
    err.print(text, soft_wrap=True, highlight=False, markup=False)


@app.command()
@one_line_errors
def init(
    dir: DirArg,
    run_id: Annotated[str, typer.Option("--run-id", help="name of the run")] = "atom-run",
    public_host: Annotated[str, typer.Option(help="address nodes use to reach this machine")]
    = "127.0.0.1",
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    ledger: Annotated[Optional[str], typer.Option(
        help="ledger database URL, e.g. postgresql+psycopg://user@host/db [default: "
             "sqlite:///ledger.db in DIR]", metavar="URL")] = None,
    force: Annotated[bool, typer.Option(help="overwrite an existing run directory")] = False,
    data: Annotated[Optional[Path], typer.Option(
        help="corpus: a folder of .txt/.md/.py/.jsonl/.parquet files or a saved datasets "
             "dataset [default: the Python stdlib]", metavar="PATH")] = None,
    licence: Annotated[Optional[str], typer.Option(
        help="SPDX licence of --data, e.g. CC-BY-4.0 (required with --data)",
        metavar="SPDX")] = None,
    tokenizer: Annotated[Optional[str], typer.Option(
        help="byte, bpe (trained on the corpus now) or a tokenizer.json [default: byte]",
        metavar="KIND")] = None,
    vocab_size: Annotated[Optional[int], typer.Option(
        help="tokens in a trained bpe vocabulary [default: 4096]", min=257)] = None,
) -> None:
    """Create DIR: run.toml, the coordinator key, a private CA and server certificate, and
    the tokenized corpus with its tokenizer and data manifest."""
    from coordinator.rundir import prepare_corpus

    more: dict[str, object] = {} if ledger is None else {"ledger_url": ledger}
    # paths given here are relative to where the command runs; run.toml's to the run dir
    if data is not None:
        more["data_source"] = str(data.expanduser().resolve())
    if tokenizer is not None:
        more["data_tokenizer"] = (tokenizer if tokenizer in ("byte", "bpe")
                                  else str(Path(tokenizer).expanduser().resolve()))
    more.update({f"data_{k}": v for k, v in
                 (("licence", licence), ("vocab_size", vocab_size)) if v is not None})
    rd = init_run(dir, force=force, run_id=run_id, network_public_host=public_host,
                  network_host=host, **more)
    err.print(f"initialised {rd.path} (ledger {shown_url(rd.config().ledger_url(rd.path))})")
    with _corpus_progress() as on_progress:
        info = prepare_corpus(rd, on_progress=on_progress)
    err.print(f"corpus: {info.n_files:,} documents, {info.n_tokens:,} tokens "
              f"({info.tokenizer_kind} tokenizer, vocabulary {info.vocab_size:,}, "
              f"manifest {info.manifest_sha256[:12]})", highlight=False, soft_wrap=True)
    say_command(f"  edit {rd.config_path}, then: atom-coordinator invite {dir} "
                "--institution NAME")


@contextmanager
def _corpus_progress() -> Iterator[Callable[[str, int, int], None]]:
    """A rich bar per corpus stage (``training.corpus.Progress``) on stderr."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, \
        TimeElapsedColumn

    tasks: dict[str, TaskID] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=False) as bars:
        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                what = f"tokenizing {total:,} documents" if stage == "tokenizing" else stage
                tasks[stage] = bars.add_task(what, total=total)
            bars.update(tasks[stage], completed=done, total=total)

        yield update


@app.command()
@one_line_errors
def invite(
    dir: DirArg,
    institution: Annotated[str, typer.Option(help="institution the node belongs to")],
    ttl_hours: Annotated[float, typer.Option(help="hours the invite stays valid")] = 168.0,
) -> None:
    """Print a single-use invite token for one node of INSTITUTION."""
    if not ttl_hours > 0:  # written so that nan is refused too
        raise AtomError("--ttl-hours must be positive")
    rd = RunDir(dir.resolve())
    token = create_invite(rd, institution, ttl_s=ttl_hours * 3600)
    print(token)
    say_command("on the node: atom-node join --token <the token above>")


@app.command("revoke-invite")
@one_line_errors
def revoke_invite(
    dir: DirArg,
    institution: Annotated[str, typer.Option(help="institution whose unused invites to revoke")],
) -> None:
    """Revoke every unused invite of INSTITUTION (nodes already enrolled keep working)."""
    from coordinator.services.revocation import revoke_invites

    n = revoke_invites(RunDir(dir.resolve()), institution)
    err.print(f"revoked {n} unused invite(s) of {institution}")


@app.command("revoke-node")
@one_line_errors
def revoke_node(
    dir: DirArg,
    node_id: Annotated[int, typer.Argument(help="ledger node id (see the TUI or the summary)")],
) -> None:
    """Revoke NODE_ID: it gets no more work, its updates are rejected, its key is dropped."""
    from coordinator.services.revocation import revoke_node as revoke

    r = revoke(RunDir(dir.resolve()), node_id)
    when = ("now" if r.unregistered
            else "when the coordinator next starts (it is not running)")
    err.print(f"revoked node {r.node_id} ({r.name}); its SuperNode key is unregistered {when}")


@app.command()
@one_line_errors
def status(
    dir: DirArg,
    as_json: Annotated[bool, typer.Option("--json", help="print the figures as JSON")] = False,
) -> None:
    """The run on one screen: version, nodes, rates, recent verdicts, last problems."""
    from coordinator.ledger import Ledger
    from coordinator.status_screen import as_dict, render_status, status as read_status

    rd = RunDir(dir.resolve())
    cfg = rd.config()
    with Ledger.read_only(cfg.ledger_url(rd.path)) as ledger:
        s = read_status(ledger, run_id=cfg.run.id)
    if as_json:
        print(json.dumps(as_dict(s)))
    else:
        render_status(s, Console())


_SUPERLINK_RESTARTS = 3  # a SuperLink that keeps dying ends the run


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


@app.command()
@one_line_errors
def start(dir: DirArg) -> None:
    """Serve the run: SuperLink (TLS, node auth), enrollment service, and the training loop."""
    from coordinator.accounting.report import render_summary, run_summary
    from coordinator.services.launcher import Coordinator
    from coordinator.services.superlink import SuperLinkDied

    rd = RunDir(dir.resolve())
    signal.signal(signal.SIGTERM, _interrupt)  # stop like Ctrl-C: children are reaped
    for attempt in range(_SUPERLINK_RESTARTS + 1):
        try:
            with Coordinator(rd) as coord:
                run_id = coord.start_run()
                cfg = coord.cfg
                say_command(f"run {cfg.run.id} (Flower run {run_id}) — nodes join with "
                            f"`atom-node join {rd.coordinator_address(cfg)} --token <invite>`")
                status = coord.wait(run_id)
                summary = run_summary(coord.ledger, cfg.ledger_url(rd.path))
                render_summary(summary, err)
                if (failure := coord.failure(status)) is not None:
                    raise AtomError(failure)
                return
        except SuperLinkDied as died:
            if attempt == _SUPERLINK_RESTARTS:
                raise
            # everything restarts; the run resumes from the ledger (as after a crash)
            err.print(f"warning: {died}; restarting the coordinator's services "
                      f"({attempt + 1}/{_SUPERLINK_RESTARTS})")
            time.sleep(2.0)  # the old ServerApp sees its SuperLink gone and leaves


@app.command()
@one_line_errors
def demo(
    nodes: Annotated[int, typer.Option(min=1, max=16, help="local nodes to start")] = 3,
    rounds: Annotated[int, typer.Option(min=1, help="training rounds")] = 3,
    workdir: Annotated[Optional[Path], typer.Option(help="run directory [default: a new "
                                                    "temporary one]")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON last")]
    = False,
    ledger: Annotated[Optional[str], typer.Option(
        help="run on this (empty) ledger database, e.g. the local PostgreSQL [default: "
             "SQLite in the run directory]", metavar="URL")] = None,
    asynchronous: Annotated[bool, typer.Option(
        "--async", help="the asynchronous loop ([async] enabled): no round barrier, ROUNDS "
                        "outer steps")] = False,
    family: Annotated[str, typer.Option(
        help="[model] family, preset tiny: gpt (the built-in, byte tokens), or llama, "
             "qwen2, gpt2 (transformers, built from config, on a BPE tokenizer of "
             f"{DEMO_BPE_VOCAB} tokens trained at init)")] = "gpt",
) -> None:
    """Run a whole network on this machine: coordinator + NODES local nodes, on CPU."""
    from coordinator.demo import demo_ok, run_demo
    from coordinator.accounting.report import render_summary

    overrides: dict[str, object] = {} if ledger is None else {"ledger_url": ledger}
    if asynchronous:
        overrides["async_enabled"] = True
    if family not in FAMILIES:
        raise ConfigError(f"--family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if family != "gpt":  # the built-in GPT demo stays byte-level, as it always was
        overrides.update(model_family=family, data_tokenizer="bpe",
                         data_vocab_size=DEMO_BPE_VOCAB, train_inner_steps=DEMO_BPE_INNER_STEPS)
    summary, _ = run_demo(nodes=nodes, rounds=rounds, workdir=workdir, console=err,
                          overrides=overrides or None)
    render_summary(summary, err)
    err.print(f"demo took {summary['seconds']:.0f} s")
    if as_json:
        print(json.dumps(summary))
    demo_ok(summary)


@app.command()
@one_line_errors
def export(
    dir: DirArg,
    fmt: Annotated[str, typer.Option(
        "--format", click_type=click.Choice(["csv", "json"]), help="csv or json")] = "json",
    out: Annotated[Optional[Path], typer.Option(
        help="write to FILE (default: standard output)", metavar="FILE")] = None,
) -> None:
    """Write the leaderboard (per institution and per node) for publishing."""
    from coordinator.accounting.leaderboard import export_text

    text = export_text(RunDir(dir.resolve()), fmt)
    if out is None:
        sys.stdout.write(text)
        return
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(text)
        tmp.replace(out)
    except OSError as exc:
        raise AtomError(f"cannot write {out}: {exc.strerror or exc}") from None
    err.print(f"wrote {out}")


@app.command("export-model")
@one_line_errors
def export_model(
    dir: DirArg,
    out: Annotated[Path, typer.Option(help="the model folder to write (new or empty)",
                                      metavar="OUT")],
    version: Annotated[Optional[int], typer.Option(
        help="model version to export [default: the latest]", min=0)] = None,
    force: Annotated[bool, typer.Option(help="replace OUT if it is not empty")] = False,
) -> None:
    """Write a model version as a Hugging Face model folder (weights, tokenizer, generation
    defaults) with a model card and atom_provenance.json: contributors, data, version
    history and the root of the receipt tree."""
    from coordinator.export.model_dir import STAGES, export_model as write

    with _delayed_progress(len(STAGES)) as on_stage:
        done = write(RunDir(dir.resolve()), out, version=version, force=force,
                     on_stage=on_stage)
    loss = "not evaluated" if done.val_loss is None else f"validation loss {done.val_loss:.4f}"
    err.print(f"wrote {done.out}: version {done.version} ({done.exported_as}, {loss}, "
              f"digest {done.digest[:12]})", highlight=False, soft_wrap=True)
    say_command(f"  receipts root {done.receipts_root}")


@app.command("eval-tasks")
@one_line_errors
def eval_tasks(
    dir: DirArg,
    version: Annotated[Optional[int], typer.Option(
        help="model version to evaluate [default: the latest]", min=0)] = None,
    tasks: Annotated[Optional[Path], typer.Option(
        help="folder of lm-eval task YAML + JSONL files [default: [eval] tasks of run.toml]",
        metavar="TASKDIR")] = None,
    task: Annotated[Optional[list[str]], typer.Option(
        help="run only this task of TASKDIR (repeatable) [default: all]",
        metavar="NAME")] = None,
    batch_size: Annotated[int, typer.Option(help="lm-eval batch size", min=1)] = 4,
    device: Annotated[str, typer.Option(help="torch device to evaluate on")] = "cpu",
) -> None:
    """Run lm-evaluation-harness tasks (local YAML + JSONL, nothing downloaded) on a model
    version and record each task's scores in the ledger; export-model puts them in the
    model card."""
    from coordinator.evals.evaluate import eval_tasks as measure

    # no bar of ours: lm-eval draws its own over its requests
    done = measure(RunDir(dir.resolve()), version=version, tasks_dir=tasks, names=task or (),
                   batch_size=batch_size, device=device)
    for s in done.scores:
        value = "-" if s.value is None else f"{s.value:.6g}"
        stderr = "" if s.stderr is None else f" ± {s.stderr:.4g}"
        print(f"{s.task}\t{s.metric}\t{s.filter}\t{value}{stderr}\t(n={s.n_samples})")
    err.print(f"recorded {len(done.scores)} scores of {len({s.task for s in done.scores})} "
              f"task(s) for version {done.version} (digest {done.digest[:12]}, "
              f"{done.harness})", highlight=False, soft_wrap=True)


@contextmanager
def _delayed_progress(total: int, after_s: float = 1.0) -> Iterator[Callable[[str], None]]:
    """A rich bar over ``total`` stages on stderr, shown only if the work takes longer than
    ``after_s``."""
    import threading

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, \
        TextColumn, TimeElapsedColumn

    bars = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=True)
    task = bars.add_task("exporting", total=total)
    timer = threading.Timer(after_s, bars.start)
    timer.daemon = True
    timer.start()

    started = 0

    def update(stage: str) -> None:  # told as each stage starts: the ones before are done
        nonlocal started
        bars.update(task, description=stage, completed=started)
        started += 1

    try:
        yield update
    finally:
        timer.cancel()
        timer.join()
        bars.stop()


def main() -> None:
    app()
