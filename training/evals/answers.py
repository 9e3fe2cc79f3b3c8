"""A model's answers to lm-eval's requests, kept request by request: what a node's task eval
lease returns and signs, and what the coordinator scores and checks.

lm-eval turns every document of a task into requests (a multiple-choice question: one
``loglikelihood`` request per choice; a perplexity text: one ``loglikelihood_rolling``) and
every metric into a function of the answers. So a node need not be trusted with a score: it
sends the answers, and the coordinator gets the scores by running lm-eval itself with a model
that only replays them (``score_answers``: no weights, no forward pass, the same task code,
seeds and aggregation as a direct run, so the same numbers). In the same pass, given its own
copy of the version, it answers the requests of a few documents per task itself (``Recheck``)
to catch a node that made answers up: the very requests the node was given, few-shot
examples included (lm-eval draws those document after document from one seeded generator,
so a run over only the sampled documents would give them other contexts).

The answers of task ``T`` are one float64 array ``"task:T"`` of shape ``(requests, 2)``:
column 0 the log-likelihood, column 1 whether the continuation is the greedy one (0 or 1;
always 0 for rolling requests), one row per request in ``(document, request index)`` order.
Only tasks whose requests are log-likelihoods travel (``LEASED_TYPES``); a ``generate_until``
task's answers are text, and stay with ``atom-coordinator eval-tasks``.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protocol.errors import AtomError
from training.evals.harness import TaskScore, eval_tokenizer, evaluate_lm, scores_of
from training.evals.tasks import TaskFile

__all__ = ["LEASED_TYPES", "PREFIX", "AnswerMismatch", "Recheck", "Replayed", "answer_tasks",
           "leased_tasks", "reads_greedy", "score_answers"]

PREFIX = "task:"
LEASED_TYPES = ("multiple_choice", "loglikelihood", "loglikelihood_rolling")
Key = tuple[int, int]  # (document id, request index)


class AnswerMismatch(AtomError):
    """Answers that are not one per request of the bundle's tasks."""


def leased_tasks(tasks: Sequence[TaskFile]) -> list[TaskFile]:
    """The tasks an eval lease can carry: those whose answers are log-likelihoods."""
    return [t for t in tasks if t.config.get("output_type") in LEASED_TYPES]


def reads_greedy(task: TaskFile) -> bool:
    """Whether a metric of ``task`` reads the greedy flags: a ``loglikelihood`` task's
    ``acc``, a multiple-choice task's ``exact_match`` (its ``acc`` compares the choices'
    log-likelihoods)."""
    kind = task.config.get("output_type")
    metrics = {m.get("metric") for m in task.config.get("metric_list") or []
               if isinstance(m, dict)}
    return kind == "loglikelihood" or (kind == "multiple_choice" and "exact_match" in metrics)


def request_tokens(tokenizer: Any, request: Any) -> int:
    """The tokens one request puts through the model (the context and continuation, or the
    rolling text): what an answered request is credited as."""
    text = "".join(request.args[:2]) if request.request_type == "loglikelihood" \
        else request.args[0]
    return len(tokenizer.encode(text, add_special_tokens=False))


def answer_tasks(model: Any, tokenizer: Any, tasks: Sequence[TaskFile], *, max_length: int,
                 batch_size: int = 4, device: str = "cpu") -> tuple[dict[str, np.ndarray], int]:
    """``model``'s answers to every request of ``tasks`` (module docstring), and the tokens
    they took (``request_tokens``).

    Raises
    ------
    AtomError
        lm-eval is missing or fails, or a task is not a ``LEASED_TYPES`` task.
    """
    _only_leased(tasks)
    got = _record(model, tokenizer, tasks, max_length=max_length, batch_size=batch_size,
                  device=device)
    return {PREFIX + t: _as_rows(answers) for t, answers in got.answers.items()}, got.tokens


@dataclass(frozen=True)
class Recheck:
    """Answer ``docs`` documents per task (drawn with ``seed``) with ``model`` too."""

    model: Any  # a transformers causal LM: the coordinator's copy of the version
    docs: int
    seed: int
    max_length: int
    batch_size: int = 4


@dataclass
class Replayed:
    """What ``score_answers`` found: the scores (None if lm-eval failed after the answers
    were read), the requests' keys in row order by task, the tokens the requests took, and
    the rechecked answers by task and key."""

    scores: list[TaskScore] | None
    keys: dict[str, list[Key]] = field(default_factory=dict)
    tokens: int = 0
    rechecked: dict[str, dict[Key, tuple[float, bool]]] = field(default_factory=dict)
    error: str = ""  # why lm-eval failed, when ``scores`` is None


def score_answers(tasks: Sequence[TaskFile], answers: Mapping[str, np.ndarray],
                  tokenizer: Any, recheck: Recheck | None = None) -> Replayed:
    """The scores lm-eval gives ``answers`` on ``tasks``, and ``recheck``'s own answers to
    its sampled documents (module docstring). If lm-eval fails once every answer was read
    (a node's absurd log-likelihood overflowing a perplexity, say), what was found is
    returned with ``scores`` None and the error: the rechecked answers still judge the node.

    Raises
    ------
    AnswerMismatch
        The answers are not exactly one row per request of every task.
    AtomError
        lm-eval is missing, or fails before every answer was read.
    """
    _only_leased(tasks)
    extra = sorted(set(answers) - {PREFIX + t.name for t in tasks})
    if extra:
        raise AnswerMismatch(f"answers for {extra[0][:80]!r}, which is not a task of the bundle")
    lm: list[Any] = []
    tok = eval_tokenizer(tokenizer)

    def replay() -> Any:
        lm.append(_replay_lm(answers, tok, recheck))
        return lm[0]

    try:
        results = evaluate_lm(replay, tasks)
    except AnswerMismatch:
        raise
    except AtomError as err:
        if not lm or set(lm[0].keys) != {t.name for t in tasks}:
            raise
        return Replayed(None, lm[0].keys, lm[0].tokens, lm[0].rechecked, str(err))
    missing = sorted({t.name for t in tasks} - set(lm[0].keys))
    if missing:
        raise AnswerMismatch(f"task {missing[0]!r} was not answered")
    return Replayed(scores_of(results, {t.name: t.digest for t in tasks}), lm[0].keys,
                    lm[0].tokens, lm[0].rechecked)


# -- lm-eval models ---------------------------------------------------------------------

class _Recorded:
    def __init__(self) -> None:
        self.answers: dict[str, dict[Key, tuple[float, bool]]] = defaultdict(dict)
        self.tokens = 0


def _record(model: Any, tokenizer: Any, tasks: Sequence[TaskFile], *, max_length: int,
            batch_size: int, device: str) -> _Recorded:
    """Run lm-eval's ``HFLM`` on ``tasks``, keeping every answer under its task and
    ``(document, request index)``."""
    rec = _Recorded()
    tok = eval_tokenizer(tokenizer)

    def hflm() -> Any:
        class Recording(_hflm_class()):  # type: ignore[misc, valid-type]
            def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
                out = super().loglikelihood(requests, disable_tqdm)
                for r, (ll, greedy) in zip(requests, out, strict=True):
                    _keep(r, float(ll), bool(greedy))
                return out

            def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False
                                      ) -> list:
                out = super().loglikelihood_rolling(requests, disable_tqdm)
                for r, ll in zip(requests, out, strict=True):
                    _keep(r, float(ll), False)
                return out

        return Recording(pretrained=model, tokenizer=tok, batch_size=batch_size,
                         device=device, max_length=max_length)

    def _keep(r: Any, ll: float, greedy: bool) -> None:
        rec.answers[r.task_name][(r.doc_id, r.idx)] = (ll, greedy)
        rec.tokens += request_tokens(tok, r)

    evaluate_lm(hflm, tasks)  # log-likelihoods only: no generation settings
    return rec


def _hflm_class() -> Any:
    from lm_eval.models.huggingface import HFLM

    return HFLM


def _replay_lm(answers: Mapping[str, np.ndarray], tokenizer: Any,
               recheck: Recheck | None) -> Any:
    from lm_eval.api.model import LM

    class Replay(LM):  # type: ignore[misc, valid-type]
        """An lm-eval model that answers each request with the row the answers hold for it,
        and with ``recheck``'s model the requests of a few documents per task as well."""

        def __init__(self) -> None:
            super().__init__()
            self.keys: dict[str, list[Key]] = {}
            self.tokens = 0
            self.rechecked: dict[str, dict[Key, tuple[float, bool]]] = {}
            self._rng = random.Random(recheck.seed) if recheck else None
            self._model: Any = None

        def _recheck(self, requests: list, method: str) -> None:
            """Answer the sampled documents' requests with the coordinator's model."""
            if recheck is None or recheck.docs <= 0:
                return
            assert self._rng is not None
            by_task: dict[str, list[Any]] = defaultdict(list)
            for r in requests:
                by_task[r.task_name].append(r)
            chosen = []
            for task in sorted(by_task):
                docs = sorted({r.doc_id for r in by_task[task]})
                picked = set(self._rng.sample(docs, min(recheck.docs, len(docs))))
                chosen += [r for r in by_task[task] if r.doc_id in picked]
            if self._model is None:
                self._model = _hflm_class()(
                    pretrained=recheck.model, tokenizer=tokenizer,
                    batch_size=recheck.batch_size, max_length=recheck.max_length)
            got = getattr(self._model, method)(chosen, disable_tqdm=True)
            for r, out in zip(chosen, got, strict=True):
                ll, greedy = out if method == "loglikelihood" else (out, False)
                self.rechecked.setdefault(r.task_name, {})[(r.doc_id, r.idx)] = \
                    (float(ll), bool(greedy))

        def _rows(self, requests: list) -> list[np.ndarray]:
            by_task: dict[str, list[Key]] = defaultdict(list)
            for r in requests:
                by_task[r.task_name].append((r.doc_id, r.idx))
            index: dict[str, dict[Key, int]] = {}
            for task, keys in by_task.items():
                arr = answers.get(PREFIX + task)
                keys = sorted(keys)
                if arr is None:
                    raise AnswerMismatch(f"task {task!r} was not answered")
                if len(arr) != len(keys) or len(set(keys)) != len(keys):
                    raise AnswerMismatch(f"task {task!r}: {len(arr)} answers for "
                                         f"{len(keys)} requests")
                self.keys[task] = keys
                index[task] = {k: i for i, k in enumerate(keys)}
            self.tokens += sum(request_tokens(tokenizer, r) for r in requests)
            return [answers[PREFIX + r.task_name][index[r.task_name][(r.doc_id, r.idx)]]
                    for r in requests]

        def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
            rows = self._rows(requests)
            self._recheck(requests, "loglikelihood")
            return [(float(a[0]), bool(a[1])) for a in rows]

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list:
            rows = self._rows(requests)
            self._recheck(requests, "loglikelihood_rolling")
            return [float(a[0]) for a in rows]

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list:
            raise AnswerMismatch("generate_until requests are not answered in eval leases")

    return Replay()


def _as_rows(answers: Mapping[Key, tuple[float, bool]]) -> np.ndarray:
    return np.array([[ll, float(greedy)] for _, (ll, greedy) in sorted(answers.items())],
                    dtype=np.float64).reshape(-1, 2)


def _only_leased(tasks: Sequence[TaskFile]) -> None:
    for t in tasks:
        if t.config.get("output_type") not in LEASED_TYPES:
            raise AtomError(f"task {t.name!r} is a {t.config.get('output_type')} task: eval "
                            f"leases answer {', '.join(LEASED_TYPES)} tasks only")
