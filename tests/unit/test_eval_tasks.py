"""``atom-coordinator eval-tasks``: lm-eval tasks shipped with the run (docs/tasks/), run
offline on a version held in memory; the scores land in the ledger for that version, equal
what lm-eval measures on the exported folder, and appear in the model card and
atom_provenance.json; every bad input is one line and a non-zero exit."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from huggingface_hub import ModelCard  # noqa: E402
from loop_world import build_test_corpus  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from coordinator.cli import app as coordinator_app  # noqa: E402
from coordinator.evals.evaluate import eval_tasks  # noqa: E402
from training.evals.harness import BOOTSTRAP_ITERS, SEED  # noqa: E402
from training.evals.tasks import load_tasks  # noqa: E402
from coordinator.export.model_dir import export_model  # noqa: E402
from coordinator.ledger import Ledger  # noqa: E402
from coordinator.rundir import RunDir, init_run  # noqa: E402
from training.checkpoint import save_checkpoint  # noqa: E402
from training.corpus import CorpusInfo, build_folder_corpus  # noqa: E402
from training.families import arch_of, spec_from_arch  # noqa: E402
from training.state import init_arrays  # noqa: E402

pytest.importorskip("lm_eval", reason="the evals extra: pip install -e '.[evals]'")

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "tasks"
TINY_GPT = {"vocab_size": 256, "block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 32}
# a generate_until task: the byte tokenizer's newline stands in for end-of-text
GEN_YAML = """task: atom_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: gen.jsonl
output_type: generate_until
test_split: test
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
filter_list:
  - name: strip
    filter:
      - function: remove_whitespace
      - function: take_first
"""


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing here may reach a hub: any connection attempt or name lookup fails the test."""
    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("eval-tasks tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def byte_corpus(tmp_path_factory: pytest.TempPathFactory) -> CorpusInfo:
    return build_test_corpus(tmp_path_factory.mktemp("corpus"), files=10)


def new_run(path: Path, corpus: CorpusInfo, arch: dict[str, Any], versions: int = 2,
            **config: object) -> RunDir:
    """A run directory holding ``versions`` versions of ``arch`` (perturbed initial
    weights), straight in its checkpoints and ledger."""
    rd = init_run(path, run_id="eval-test", **config)
    shutil.copytree(corpus.path, rd.corpus, dirs_exist_ok=True)
    arch = arch_of(spec_from_arch(arch))
    with rd.ledger() as ledger:
        for v in range(versions):
            rng = np.random.default_rng(v)
            arrays = {k: (a + 0.05 * rng.standard_normal(a.shape)).astype(np.float32)
                      for k, a in init_arrays(spec_from_arch(arch), v).items()}
            path_, digest = save_checkpoint(rd.checkpoints, arrays,
                                            {"version": v, "model": arch, "round": v})
            ledger.add_model_version(v, digest, str(path_), v, n_updates=v, tokens=100 * v)
    return rd


def tasks_copy(dest: Path, gen: bool = False) -> Path:
    shutil.copytree(EXAMPLE, dest)
    if gen:
        (dest / "gen.yaml").write_text(GEN_YAML)
        (dest / "gen.jsonl").write_text('{"prompt": "The cat sat on a", "answer": "mat"}\n'
                                        '{"prompt": "The dog ran to the", "answer": "ball"}\n')
    return dest


def ledger_scores(rd: RunDir) -> list[tuple]:
    with Ledger.read_only(f"sqlite:///{rd.path / 'ledger.db'}") as ledger:
        return [(r.version, r.task, r.metric, r.filter, r.value, r.stderr, r.n_samples,
                 r.task_digest, r.harness) for r in ledger.task_scores()]


def run_cli(*args: object):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(coordinator_app, ["eval-tasks", *map(str, args)],
                              catch_exceptions=False)


# -- measuring -------------------------------------------------------------------------------


def test_a_version_is_measured_offline_and_its_scores_recorded(
        tmp_path: Path, byte_corpus: CorpusInfo) -> None:
    """The byte tokenizer (no end-of-text), a generate_until task, the run's ``[eval] tasks``
    folder, one version of two; the global RNGs are left as they were."""
    rd = new_run(tmp_path / "run", byte_corpus, TINY_GPT, eval_tasks="tasks")
    tasks_copy(rd.path / "tasks", gen=True)
    random.seed(5)
    before = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    result = run_cli(rd.path, "--version", 0)
    assert result.exit_code == 0, result.output
    assert random.getstate() == before[0]
    assert (np.random.get_state()[1] == before[1]).all()
    assert torch.equal(torch.get_rng_state(), before[2])
    rows = ledger_scores(rd)
    digests = {t.name: t.digest for t in load_tasks(rd.path / "tasks")}
    assert {(r[1], r[2], r[3]) for r in rows} == {
        ("atom_gen", "exact_match", "strip"),
        ("atom_python_mc", "acc", "none"), ("atom_python_mc", "acc_norm", "none"),
        ("atom_python_ppl", "bits_per_byte", "none"),
        ("atom_python_ppl", "byte_perplexity", "none"),
        ("atom_python_ppl", "word_perplexity", "none")}
    for version, task, metric, _, value, stderr, n, digest, harness in rows:
        assert version == 0 and harness == "lm-eval 0.4.13" and digest == digests[task]
        assert n == {"atom_gen": 2, "atom_python_mc": 8, "atom_python_ppl": 5}[task]
        assert value is not None and np.isfinite(value)
        if metric in ("acc", "acc_norm", "exact_match"):
            assert 0 <= value <= 1 and stderr is not None  # a mean: closed-form stderr
    printed = [line.split("\t") for line in result.stdout.strip().splitlines()]
    assert [(p[0], p[1], p[2]) for p in printed] == [(r[1], r[2], r[3]) for r in rows]
    assert "recorded 6 scores of 3 task(s) for version 0" in result.stderr
    # measured again, one task only: its rows are replaced (by the same numbers: the seeds
    # are fixed), the other tasks' kept
    again = run_cli(rd.path, "--version", 0, "--task", "atom_python_mc")
    assert again.exit_code == 0, again.output
    assert "recorded 2 scores of 1 task(s)" in again.stderr
    assert ledger_scores(rd) == rows


def test_the_scores_are_lm_evals_on_the_export_and_the_card_lists_them(
        tmp_path: Path, byte_corpus: CorpusInfo) -> None:
    """A BPE run (end-of-text id): eval-tasks on the version in memory gives what lm-eval
    itself gives on the exported folder; the export's card and provenance carry the
    ledger's scores."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    bpe = build_folder_corpus(byte_corpus.path.parent / "text", tmp_path / "bpe",
                              val_every=5, licence="CC-BY-4.0", tokenizer="bpe",
                              vocab_size=300)
    rd = new_run(tmp_path / "run", bpe, {**TINY_GPT, "vocab_size": bpe.vocab_size})
    done = eval_tasks(rd, tasks_dir=EXAMPLE)
    assert done.version == 1 and len(done.scores) == 5
    out = tmp_path / "model"
    export_model(rd, out)

    configs = [dict(t.config, dataset_kwargs={**t.config["dataset_kwargs"],
                                              "cache_dir": str(tmp_path / "cache")})
               for t in load_tasks(EXAMPLE)]
    direct = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(out)}, device="cpu", batch_size=4,
        tasks=configs, task_manager=TaskManager(include_defaults=False), log_samples=False,
        bootstrap_iters=BOOTSTRAP_ITERS, random_seed=SEED, numpy_random_seed=SEED,
        torch_random_seed=SEED, fewshot_random_seed=SEED)
    for s in done.scores:
        got = direct["results"][s.task]
        assert s.value == pytest.approx(float(got[f"{s.metric},{s.filter}"]), rel=1e-6), s
        assert s.n_samples == direct["n-samples"][s.task]["effective"]

    prov = json.loads((out / "atom_provenance.json").read_text())
    want = [{"task": s.task, "metric": s.metric, "filter": s.filter, "value": s.value,
             "stderr": s.stderr, "n_samples": s.n_samples, "task_digest": s.task_digest,
             "harness": done.harness} for s in done.scores]
    assert prov["task_scores"] == want
    card = ModelCard.load(out / "README.md")
    metrics = {(r["dataset"]["type"], m["type"]): (m["value"], r["dataset"]["revision"])
               for r in card.data.to_dict()["model-index"][0]["results"]
               for m in r["metrics"]}
    for s in done.scores:
        assert metrics[(s.task, s.metric)] == (s.value, s.task_digest)
    body = card.text
    assert "## Task scores" in body and "lm-eval 0.4.13" in body
    for s in done.scores:
        assert f"| {s.task} | {s.metric} | {s.filter} | {s.value:.6g} |" in body


def test_an_export_of_a_version_without_scores_has_none(tmp_path: Path,
                                                        byte_corpus: CorpusInfo) -> None:
    rd = new_run(tmp_path / "run", byte_corpus, TINY_GPT, versions=1)
    export_model(rd, tmp_path / "model")
    prov = json.loads((tmp_path / "model" / "atom_provenance.json").read_text())
    assert prov["task_scores"] == []
    assert "## Task scores" not in (tmp_path / "model" / "README.md").read_text()


# -- bad input -------------------------------------------------------------------------------


def one_line_error(result, code: int, text: str) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], lines


@pytest.fixture
def small_run(tmp_path: Path, byte_corpus: CorpusInfo) -> RunDir:
    return new_run(tmp_path / "run", byte_corpus, TINY_GPT, versions=1)


def test_no_task_folder_given_or_configured(small_run: RunDir) -> None:
    one_line_error(run_cli(small_run.path), 2, "no task folder: pass --tasks")


def test_a_task_folder_that_does_not_exist(small_run: RunDir, tmp_path: Path) -> None:
    one_line_error(run_cli(small_run.path, "--tasks", tmp_path / "nope"), 2, "does not exist")


@pytest.mark.parametrize("text, message", [
    ("task: [unclosed\n", "invalid YAML"),
    ("task: x\nclass: !function tasks.MyTask\n", "invalid YAML"),  # no code runs
    ("- a list\n", "not a task config"),
    ("include: other.yaml\ntask: x\n", "include: is not supported"),
    ("task: x\ndataset_path: EleutherAI/hellaswag\n", "dataset_path must be json"),
    ("task: x\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
     "    test: https://example.org/x.jsonl\n", "must be local files"),
    ("task: atom_python_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
     "    test: python_mc.jsonl\n", "also defined in"),
])
def test_a_bad_task_file(small_run: RunDir, tmp_path: Path, text: str, message: str) -> None:
    folder = tasks_copy(tmp_path / "tasks")
    (folder / "zz_bad.yaml").write_text(text)
    one_line_error(run_cli(small_run.path, "--tasks", folder), 2, message)
    assert ledger_scores(small_run) == []


def test_a_missing_or_broken_jsonl(small_run: RunDir, tmp_path: Path) -> None:
    folder = tasks_copy(tmp_path / "tasks")
    (folder / "python_ppl.jsonl").unlink()
    one_line_error(run_cli(small_run.path, "--tasks", folder), 2, "python_ppl.jsonl is missing")
    (folder / "python_ppl.jsonl").write_text('{"text": "x"}\nnot json\n')
    one_line_error(run_cli(small_run.path, "--tasks", folder), 2,
                   "python_ppl.jsonl line 2 is not a JSON object")


def test_a_task_name_not_in_the_folder(small_run: RunDir) -> None:
    one_line_error(run_cli(small_run.path, "--tasks", EXAMPLE, "--task", "hellaswag"), 2,
                   "task 'hellaswag' is not in")


def test_lm_eval_not_installed(small_run: RunDir, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "lm_eval" else real(name, *a))
    one_line_error(run_cli(small_run.path, "--tasks", EXAMPLE), 1,
                   "lm-eval is not installed (lm_eval missing): pip install")


def test_a_version_the_ledger_does_not_have(small_run: RunDir) -> None:
    one_line_error(run_cli(small_run.path, "--tasks", EXAMPLE, "--version", 7), 6,
                   "version 7 is not in the ledger")


def test_a_task_lm_eval_refuses(small_run: RunDir, tmp_path: Path) -> None:
    folder = tasks_copy(tmp_path / "tasks")
    text = (folder / "python_mc.yaml").read_text()
    (folder / "python_mc.yaml").write_text(text.replace("output_type: multiple_choice",
                                                        "output_type: no_such_type"))
    one_line_error(run_cli(small_run.path, "--tasks", folder, "--task", "atom_python_mc"), 1,
                   "lm-eval failed: ")
    assert ledger_scores(small_run) == []
