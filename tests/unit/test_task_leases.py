"""lm-eval tasks in nodes' eval leases: the task bundle blob, answers a coordinator scores
with lm-eval itself, the judge that recomputes sampled documents, the screening of a tasks
reply, and the run loop leasing the tasks of a version to a node and recording the scores its
answers make (or rejecting a node that lied about them)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from loop_world import build_test_corpus, make_net  # noqa: E402

from coordinator.export.hf import hf_tokenizer  # noqa: E402
from coordinator.run.task_evals import MAX_TRIES  # noqa: E402
from coordinator.verify.reply import Expected, verify  # noqa: E402
from coordinator.verify.task_judge import TaskJudge  # noqa: E402
from protocol.errors import AtomError, ConfigError, ProtocolError, Reason  # noqa: E402
from protocol.messages import Kind, Lease, Update, UpdateMetrics  # noqa: E402
from protocol.signing import generate_key, public_key_pem, sign_update  # noqa: E402
from protocol.digest import digest_arrays  # noqa: E402
from training.checkpoint import load_checkpoint  # noqa: E402
from training.corpus import CorpusInfo  # noqa: E402
from training.evals.answers import (  # noqa: E402
    PREFIX, AnswerMismatch, answer_tasks, score_answers,
)
from training.evals.bundle import pack_tasks, unpack_tasks  # noqa: E402
from training.evals.harness import run_tasks  # noqa: E402
from training.evals.tasks import load_tasks  # noqa: E402
from training.families import spec_from_arch  # noqa: E402
from training.hf_convert import to_transformers  # noqa: E402
from training.state import init_arrays  # noqa: E402

pytest.importorskip("lm_eval", reason="the evals extra: pip install -e '.[evals]'")

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "tasks"
SEED_ALL_THREE = 0  # a loop seed whose draws lease the tasks to the honest node last
ARCH = {"vocab_size": 256, "block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 32}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> CorpusInfo:
    return build_test_corpus(tmp_path_factory.mktemp("task-corpus"))


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> list:
    return unpack_tasks(pack_tasks(load_tasks(EXAMPLE)), tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def model_and_tokenizer(corpus: CorpusInfo) -> tuple[Any, Any, dict]:
    arrays = init_arrays(spec_from_arch(ARCH), seed=3)
    model, _ = to_transformers(arrays, ARCH)
    return model, hf_tokenizer(corpus, ARCH["block_size"]), arrays


@pytest.fixture(scope="module")
def answered(tasks: list, model_and_tokenizer) -> tuple[dict[str, np.ndarray], int]:
    model, tok, _ = model_and_tokenizer
    return answer_tasks(model, tok, tasks, max_length=ARCH["block_size"])


# -- the bundle -------------------------------------------------------------------------

def test_bundle_round_trip_keeps_every_task_and_its_digest(tmp_path: Path) -> None:
    folder = load_tasks(EXAMPLE)
    data = pack_tasks(folder)
    assert data == pack_tasks(list(reversed(folder)))  # canonical: one task set, one digest
    back = unpack_tasks(data, tmp_path)
    assert [(t.name, t.digest) for t in back] == [(t.name, t.digest) for t in folder]
    assert all(tmp_path in t.path.parents for t in back)


def _bundle(files: dict[str, str], yaml_name: str = "t.yaml", **extra: Any) -> bytes:
    yaml = ("task: t\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: "
            f"{next(iter(files), 'x.jsonl')}\noutput_type: loglikelihood_rolling\n"
            "test_split: test\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n")
    doc = {"atom_tasks": 1, "tasks": [{"yaml_name": yaml_name, "yaml": yaml, "files": files}]}
    doc.update(extra)
    return json.dumps(doc).encode()


@pytest.mark.parametrize("data, message", [
    (b"\xff\xfe", "not UTF-8 JSON"),
    (json.dumps({"atom_tasks": 2, "tasks": []}).encode(), "not a format-1 task bundle"),
    (_bundle({"../escape.jsonl": '{"text": "a"}\n'}), "leaves its folder"),
    (_bundle({"/etc/x.jsonl": '{"text": "a"}\n'}), "leaves its folder"),
    (_bundle({"x.jsonl": '{"text": "a"}\n'}, yaml_name="../t.yaml"), "is not a file name"),
    (_bundle({"x.jsonl": '{"text": "a"}\n'}, more=1), "not a format-1 task bundle"),
])
def test_a_bundle_that_is_not_one_is_refused_before_anything_leaves_its_folder(
        tmp_path: Path, data: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        unpack_tasks(data, tmp_path / "in")
    assert not list(tmp_path.rglob("escape.jsonl"))  # nothing written outside "in"/<task>


def test_a_bundled_task_is_checked_again_on_the_node(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="line 1 is not a JSON object"):
        unpack_tasks(_bundle({"x.jsonl": "not json\n"}), tmp_path)


def test_data_outside_the_task_folder_cannot_be_bundled(tmp_path: Path) -> None:
    (tmp_path / "data.jsonl").write_text('{"text": "a b"}\n')
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "t.yaml").write_text(
        _bundle({"../data.jsonl": ""}).decode() and json.loads(_bundle({"../data.jsonl": ""}))
        ["tasks"][0]["yaml"])
    with pytest.raises(ConfigError, match="outside the task's folder"):
        pack_tasks(load_tasks(tmp_path / "tasks"))


# -- answers, scored by replay ----------------------------------------------------------

def test_replayed_answers_score_exactly_what_a_direct_run_scores(
        tasks: list, model_and_tokenizer, answered) -> None:
    model, tok, _ = model_and_tokenizer
    answers, tokens = answered
    assert sorted(answers) == [PREFIX + "atom_python_mc", PREFIX + "atom_python_ppl"]
    assert answers[PREFIX + "atom_python_mc"].shape == (8 * 4, 2)  # 8 questions x 4 choices
    assert answers[PREFIX + "atom_python_ppl"].shape == (5, 2)
    direct = run_tasks(model, tok, tasks, max_length=ARCH["block_size"])
    replayed = score_answers(tasks, answers, tok)
    assert replayed.scores == direct  # values and stderrs, to the bit
    assert replayed.tokens == tokens > 0


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, PREFIX + "atom_python_mc": a[PREFIX + "atom_python_mc"][:-1]},
     "31 answers for 32 requests"),
    (lambda a: {k: v for k, v in a.items() if "ppl" not in k}, "atom_python_ppl.*not answered"),
    (lambda a: {**a, PREFIX + "other": a[PREFIX + "atom_python_ppl"]}, "not a task of the bundle"),
])
def test_answers_that_are_not_one_per_request_are_a_mismatch(
        tasks: list, model_and_tokenizer, answered, change, message: str) -> None:
    with pytest.raises(AnswerMismatch, match=message):
        score_answers(tasks, change(answered[0]), model_and_tokenizer[1])


def test_the_judge_accepts_honest_answers_and_catches_one_changed_document(
        tasks: list, model_and_tokenizer, answered) -> None:
    _, tok, arrays = model_and_tokenizer
    answers, tokens = answered
    judge = TaskJudge(tasks, tok, ARCH, check_docs=100, tolerance=0.01)
    ok = judge.check(arrays, answers, tokens, seed=1)
    assert ok.accepted and ok.scores and "13 documents recomputed" in ok.detail
    # the right answer of question 0 made the likeliest: recomputing every document sees it
    lie = {k: v.copy() for k, v in answers.items()}
    lie[PREFIX + "atom_python_mc"][0, 0] = -1e-3
    bad = judge.check(arrays, lie, tokens, seed=1)
    assert bad.reason == Reason.EVAL_MISMATCH and "atom_python_mc document 0" in bad.detail
    assert judge.check(arrays, answers, tokens + 1, seed=1).reason == \
        Reason.METRICS_INCONSISTENT


# -- screening a tasks reply ------------------------------------------------------------

def _lease(n_tasks: int = 2) -> Lease:
    return Lease(run_id="r", round=1, shard_id=0, kind=Kind.TASKS.value, base_version=1,
                 base_digest="a" * 64, data_start=0, data_end=n_tasks, data_digest="b" * 64,
                 tokenizer_digest="c" * 64, data_manifest="d" * 64, inner_steps=0,
                 batch_size=2, seq_len=32, lr=0.0, weight_decay=0.0, seed=0,
                 deadline=2e9, nonce="e" * 32)


def _screen(arrays: dict[str, np.ndarray], tokens: int = 10, loss: float | None = None) -> Any:
    key, lease = generate_key(), _lease()
    if loss is None:
        loss = -sum(float(a[:, 0].sum()) for a in arrays.values()) / tokens
    update = sign_update(Update(lease, 7, digest_arrays(arrays), UpdateMetrics(
        tokens=tokens, steps=0, loss_before=loss, loss_after=loss, wall_s=1.0)), key)
    return verify(update, arrays, Expected(lease=lease, node_id=7,
                                           public_key_pem=public_key_pem(key),
                                           current_version=1, shapes={}, max_norm=1e9,
                                           now=1e9))


def test_a_well_formed_tasks_reply_passes_screening() -> None:
    ruling = _screen({PREFIX + "t": np.array([[-1.5, 0.0], [-0.5, 1.0]])})
    assert ruling.accepted, ruling.detail


@pytest.mark.parametrize("arrays, kw, reason", [
    ({PREFIX + "t": np.array([[0.5, 0.0]])}, {}, Reason.METRICS_INCONSISTENT),
    ({PREFIX + "t": np.array([[-0.5, 2.0]])}, {}, Reason.METRICS_INCONSISTENT),
    ({PREFIX + "t": np.array([[-0.5, 0.0]])}, {"loss": 0.01}, Reason.METRICS_INCONSISTENT),
    ({"window_loss": np.array([[-0.5, 0.0]])}, {}, Reason.SHAPE_MISMATCH),
    ({PREFIX + "t": np.array([-0.5, 0.0])}, {"loss": 0.05}, Reason.SHAPE_MISMATCH),
    ({PREFIX + "t": np.array([[-0.5, 0.0]], dtype=np.float32)}, {}, Reason.SHAPE_MISMATCH),
    ({PREFIX + f"t{i}": np.array([[-0.5, 0.0]]) for i in range(3)}, {}, Reason.SHAPE_MISMATCH),
    ({PREFIX + "t": np.array([[np.nan, 0.0]])}, {"loss": 1.0}, Reason.NON_FINITE),
])
def test_a_malformed_tasks_reply_is_a_typed_rejection(arrays, kw, reason) -> None:
    ruling = _screen(arrays, **kw)
    assert not ruling.accepted and ruling.reason == reason, ruling.detail


# -- the node ---------------------------------------------------------------------------

def test_a_node_without_lm_eval_fails_the_lease_with_one_line(
        monkeypatch: pytest.MonkeyPatch, model_and_tokenizer) -> None:
    from node.task_lease import run_task_lease
    from training.evals import harness

    monkeypatch.setattr(harness, "_NEEDED", ("lm_eval", "no_such_module_atom"))
    with pytest.raises(AtomError, match=r"lm-eval is not installed .*pip install"):
        run_task_lease(model_and_tokenizer[2], ARCH, b"{}", b"{}", device="cpu", batch_size=2)


# -- the run loop -----------------------------------------------------------------------

def _tasks_section(every: int = 0, check_docs: int = 2) -> str:
    return (f'[eval]\ntasks = "{EXAMPLE}"\ntasks_every = {every}\n'
            f"tasks_check_docs = {check_docs}\n")


def test_a_node_runs_the_tasks_and_its_answers_become_the_versions_scores(
        tmp_path: Path, corpus: CorpusInfo) -> None:
    net = make_net(tmp_path, corpus, ["honest", "honest"], rounds=2,
                   extra=_tasks_section(every=2))
    net.run()
    leases = [x for x in net.ledger.leases() if x.kind == Kind.TASKS]
    assert sorted(x.base_version for x in leases) == [0, 2]  # every 2nd version, and the last
    assert all(x.status == "answered" for x in leases)
    updates = {u.lease_id: u for u in net.ledger.updates()}
    for x in leases:
        u = updates[x.id]
        assert u.verdict == "accepted" and u.tokens > 0, u.detail
        assert "documents recomputed" in u.detail
    credits = {c.update_id for c in net.ledger.credits()}
    assert all(updates[x.id].id in credits for x in leases)  # paid like an evaluation
    kinds = {x.id: x.kind for x in net.ledger.leases()}
    evaluated = sum(u.tokens for u in updates.values()
                    if kinds[u.lease_id] != "train" and u.verdict == "accepted")
    assert sum(s.eval_tokens for s in net.ledger.node_summaries()) == evaluated
    # the scores are lm-eval's on the version itself, measured here directly
    version = net.ledger.versions()[-1]
    arrays, _ = load_checkpoint(version.path)
    model, _ = to_transformers(arrays, dict(net.loop.arch))
    direct = run_tasks(model, hf_tokenizer(corpus, net.store.spec.block_size),
                       load_tasks(EXAMPLE), max_length=net.store.spec.block_size,
                       batch_size=net.cfg.train.batch_size)
    rows = net.ledger.task_scores(version.version)
    assert [(r.task, r.metric, r.value, r.stderr) for r in rows] == \
        [(s.task, s.metric, s.value, s.stderr) for s in direct]
    assert all("answers of node-" in r.harness for r in rows)


def test_a_node_that_lies_about_its_answers_is_rejected_and_no_score_is_recorded(
        tmp_path: Path, corpus: CorpusInfo) -> None:
    net = make_net(tmp_path, corpus, ["tasks_lie"], rounds=1, extra=_tasks_section())
    net.run()
    (lease,) = [x for x in net.ledger.leases() if x.kind == Kind.TASKS]
    (update,) = [u for u in net.ledger.updates() if u.lease_id == lease.id]
    assert update.verdict == "rejected" and update.reason == Reason.EVAL_MISMATCH
    assert lease.nonce in net.nodes[0].attacked
    assert net.ledger.task_scores(net.ledger.versions()[-1].version) == []
    assert any(c.update_id == update.id and c.amount < 0 for c in net.ledger.credits())


def test_without_task_leases_a_run_leases_none(tmp_path: Path, corpus: CorpusInfo) -> None:
    net = make_net(tmp_path, corpus, ["honest"], rounds=1)
    net.run()
    assert not [x for x in net.ledger.leases() if x.kind == Kind.TASKS]
    assert dataclasses.asdict(net.cfg.eval)["tasks"] is None


def test_judged_on_a_thread_beside_the_loop_the_verdict_is_recorded_before_the_run_ends(
        tmp_path: Path, corpus: CorpusInfo) -> None:
    net = make_net(tmp_path, corpus, ["honest"], rounds=1, extra=_tasks_section())
    assert net.loop.task_evals is not None
    net.loop.task_evals.beside = True  # as with checker processes: a thread judges
    net.run()
    (lease,) = [x for x in net.ledger.leases() if x.kind == Kind.TASKS]
    (update,) = [u for u in net.ledger.updates() if u.lease_id == lease.id]
    assert update.verdict == "accepted", update.detail
    assert net.ledger.task_scores(lease.base_version)


def test_the_asynchronous_loop_leases_the_last_versions_tasks(
        tmp_path: Path, corpus: CorpusInfo) -> None:
    net = make_net(tmp_path, corpus, ["honest", "honest"], rounds=2,
                   extra="[async]\nenabled = true\n" + _tasks_section())
    net.run()
    leases = [x for x in net.ledger.leases() if x.kind == Kind.TASKS]
    assert [x.base_version for x in leases] == [2]
    assert net.ledger.task_scores(2)


def test_tasks_a_node_failed_or_lied_about_go_to_another_node(
        tmp_path: Path, corpus: CorpusInfo) -> None:
    net = make_net(tmp_path, corpus, [("error", ("tasks",)), "tasks_lie", "honest"], rounds=1,
                   extra=_tasks_section(), seed=SEED_ALL_THREE)
    net.run()
    leases = sorted((x for x in net.ledger.leases() if x.kind == Kind.TASKS),
                    key=lambda x: x.id)
    assert len(leases) == 3 and len({x.node_id for x in leases}) == 3, leases
    honest = next(n for n in net.nodes if n.behaviour == "honest")
    assert leases[-1].node_id == honest.id  # tried until the honest node's answers stood
    verdicts = {u.lease_id: u.verdict for u in net.ledger.updates()}
    assert verdicts[leases[-1].id] == "accepted"
    assert all(verdicts.get(x.id) != "accepted" for x in leases[:-1])
    assert net.ledger.task_scores(leases[-1].base_version)


def test_after_max_tries_the_version_has_no_node_scores(
        tmp_path: Path, corpus: CorpusInfo) -> None:
    net = make_net(tmp_path, corpus, ["tasks_lie"] * 4, rounds=1, extra=_tasks_section())
    net.run()
    leases = [x for x in net.ledger.leases() if x.kind == Kind.TASKS]
    assert len(leases) == MAX_TRIES and len({x.node_id for x in leases}) == MAX_TRIES
    assert net.ledger.task_scores(leases[0].base_version) == []
    assert any(f"after {MAX_TRIES} tries" in e.message for e in net.ledger.events())


def test_the_task_lease_bench_times_every_side_and_the_judge_accepts() -> None:
    from tests.bench_module import load_bench

    out = load_bench("task_lease").run("tiny", EXAMPLE, repeats=1, check_docs=1, batch_size=2)
    assert out["requests"] == 37 and out["tokens"] > 0 and out["tasks"] == 2
    assert min(out["direct_s"], out["answer_s"], out["replay_s"], out["judge_s"]) > 0


LOGLIKELIHOOD_YAML = """task: atom_next
dataset_path: json
dataset_kwargs:
  data_files:
    test: next.jsonl
output_type: loglikelihood
test_split: test
doc_to_text: "{{context}}"
doc_to_target: "{{target}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_a_greedy_flag_is_checked_only_where_a_metric_reads_it(
        tmp_path: Path, tasks: list, model_and_tokenizer, answered) -> None:
    _, tok, arrays = model_and_tokenizer
    # multiple choice: acc compares the choices' log-likelihoods, the flag is read by nothing
    answers, tokens = answered
    flipped = {k: v.copy() for k, v in answers.items()}
    flipped[PREFIX + "atom_python_mc"][:, 1] = 1.0 - flipped[PREFIX + "atom_python_mc"][:, 1]
    judge = TaskJudge(tasks, tok, ARCH, check_docs=100, tolerance=0.01)
    assert judge.check(arrays, flipped, tokens, seed=1).accepted
    # a loglikelihood task's acc is the flag: a flipped one is a lie
    (tmp_path / "next.yaml").write_text(LOGLIKELIHOOD_YAML)
    (tmp_path / "next.jsonl").write_text('{"context": "def f(x):\\n    return", "target": " x"}\n'
                                         '{"context": "import", "target": " os"}\n')
    next_tasks = load_tasks(tmp_path)
    model, _, _ = model_and_tokenizer
    mine, mine_tokens = answer_tasks(model, tok, next_tasks, max_length=ARCH["block_size"])
    judge = TaskJudge(next_tasks, tok, ARCH, check_docs=100, tolerance=0.01)
    assert judge.check(arrays, mine, mine_tokens, seed=1).accepted
    mine[PREFIX + "atom_next"][0, 1] = 1.0 - mine[PREFIX + "atom_next"][0, 1]
    bad = judge.check(arrays, mine, mine_tokens, seed=1)
    assert bad.reason == Reason.EVAL_MISMATCH and "greedy" in bad.detail


def test_honest_answers_to_a_few_shot_task_pass_the_recomputation(
        tmp_path: Path, model_and_tokenizer) -> None:
    """lm-eval draws few-shot examples document after document from one seeded generator:
    a recomputation over only the sampled documents would give them other contexts and
    reject an honest node. The judge answers them on the node's very requests."""
    model, tok, arrays = model_and_tokenizer
    yaml = (EXAMPLE / "python_mc.yaml").read_text() + "num_fewshot: 2\n"
    (tmp_path / "python_mc.yaml").write_text(yaml)
    (tmp_path / "python_mc.jsonl").write_text((EXAMPLE / "python_mc.jsonl").read_text())
    few = load_tasks(tmp_path)
    answers, tokens = answer_tasks(model, tok, few, max_length=ARCH["block_size"])
    for seed in range(3):
        check = TaskJudge(few, tok, ARCH, check_docs=2, tolerance=0.01).check(
            arrays, answers, tokens, seed=seed)
        assert check.accepted, check.detail


def test_an_absurd_answer_lm_eval_cannot_aggregate_is_a_rejection_not_a_crash(
        tasks: list, model_and_tokenizer, answered) -> None:
    _, tok, arrays = model_and_tokenizer
    answers, tokens = answered
    absurd = {k: v.copy() for k, v in answers.items()}
    absurd[PREFIX + "atom_python_ppl"][0, 0] = -1e6  # exp() of its perplexity overflows
    judge = TaskJudge(tasks, tok, ARCH, check_docs=1, tolerance=0.01)
    reasons = {judge.check(arrays, absurd, tokens, seed=s).reason for s in range(4)}
    # caught by the sample where document 0 is drawn, else refused when scoring fails
    assert reasons <= {Reason.EVAL_MISMATCH, Reason.METRICS_INCONSISTENT} and reasons


def test_the_last_version_gets_its_tasks_lease_even_when_it_was_not_due(
        tmp_path: Path, corpus: CorpusInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lock-step run whose last round accepted nothing made its last version a round
    earlier, when it was not due (and a restart loses a lease in flight): the run's end
    leases it then."""
    from coordinator.run.task_evals import TaskEvals

    monkeypatch.setattr(TaskEvals, "due", lambda self, version, round: False)
    net = make_net(tmp_path, corpus, ["honest"], rounds=1, extra=_tasks_section())
    net.run()
    (lease,) = [x for x in net.ledger.leases() if x.kind == Kind.TASKS]
    assert lease.base_version == net.store.version == 1
    assert net.ledger.task_scores(1)
