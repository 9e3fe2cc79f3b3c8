"""A model's answers to lm-eval's requests, kept request by request: what a node's task eval
lease returns and signs, and what the coordinator scores and checks.

lm-eval turns every document of a task into requests (a multiple-choice question: one
``loglikelihood`` request per choice; a perplexity text: one ``loglikelihood_rolling``) and
every metric into a function of the answers. So a node need not be trusted with a score: it
sends the answers, and the coordinator gets the scores by running lm-eval itself with a model
that only replays them (``score_answers``: no weights, no forward pass, the same task code,
seeds and aggregation as a direct run, so the same numbers), then recomputes a sample of the
answers with its own copy of the version (``recompute``) to catch a node that made them up.

The answers of task ``T`` are one float64 array ``"task:T"`` of shape ``(requests, 2)``:
column 0 the log-likelihood, column 1 whether the continuation is the greedy one (0 or 1;
always 0 for rolling requests), one row per request in ``(document, request index)`` order.
Only tasks whose requests are log-likelihoods travel (``LEASED_TYPES``); a ``generate_until``
task's answers are text, and stay with ``atom-coordinator eval-tasks``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from protocol.errors import AtomError
from training.evals.harness import TaskScore, eval_tokenizer, evaluate_lm, scores_of
from training.evals.tasks import TaskFile

__all__ = ["LEASED_TYPES", "PREFIX", "AnswerMismatch", "Replayed", "answer_tasks",
           "leased_tasks", "recompute", "score_answers"]

PREFIX = "task:"
LEASED_TYPES = ("multiple_choice", "loglikelihood", "loglikelihood_rolling")
Key = tuple[int, int]  # (document id, request index)


class AnswerMismatch(AtomError):
    """Answers that are not one per request of the bundle's tasks."""


def leased_tasks(tasks: Sequence[TaskFile]) -> list[TaskFile]:
    """The tasks an eval lease can carry: those whose answers are log-likelihoods."""
    return [t for t in tasks if t.config.get("output_type") in LEASED_TYPES]


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
    got = _record(model, tokenizer, tasks, None, max_length=max_length, batch_size=batch_size,
                  device=device)
    return {PREFIX + t: _rows(answers) for t, answers in got.answers.items()}, got.tokens


def recompute(model: Any, tokenizer: Any, tasks: Sequence[TaskFile],
              docs: Mapping[str, Sequence[int]], *, max_length: int, batch_size: int = 4,
              device: str = "cpu") -> dict[str, dict[Key, tuple[float, bool]]]:
    """``model``'s answers to the requests of the documents ``docs`` names, by task and
    ``(document, request index)``."""
    picks = {t: sorted(set(d)) for t, d in docs.items() if d}
    chosen = [t for t in tasks if t.name in picks]
    if not chosen:
        return {}
    return _record(model, tokenizer, chosen, picks, max_length=max_length,
                   batch_size=batch_size, device=device).answers


class Replayed:
    """What ``score_answers`` found: the scores, the requests' keys in row order by task,
    and the tokens the requests took."""

    def __init__(self, scores: list[TaskScore], keys: dict[str, list[Key]], tokens: int):
        self.scores, self.keys, self.tokens = scores, keys, tokens


def score_answers(tasks: Sequence[TaskFile], answers: Mapping[str, np.ndarray],
                  tokenizer: Any) -> Replayed:
    """The scores lm-eval gives ``answers`` on ``tasks`` (module docstring).

    Raises
    ------
    AnswerMismatch
        The answers are not exactly one row per request of every task.
    AtomError
        lm-eval is missing or fails.
    """
    _only_leased(tasks)
    extra = sorted(set(answers) - {PREFIX + t.name for t in tasks})
    if extra:
        raise AnswerMismatch(f"answers for {extra[0][:80]!r}, which is not a task of the bundle")
    lm: list[Any] = []

    def replay() -> Any:
        lm.append(_replay_lm(answers, eval_tokenizer(tokenizer)))
        return lm[0]

    results = evaluate_lm(replay, tasks)
    missing = sorted({t.name for t in tasks} - set(lm[0].keys))
    if missing:
        raise AnswerMismatch(f"task {missing[0]!r} was not answered")
    return Replayed(scores_of(results, {t.name: t.digest for t in tasks}), lm[0].keys,
                    lm[0].tokens)


# -- lm-eval models ---------------------------------------------------------------------

class _Recorded:
    def __init__(self) -> None:
        self.answers: dict[str, dict[Key, tuple[float, bool]]] = defaultdict(dict)
        self.tokens = 0


def _record(model: Any, tokenizer: Any, tasks: Sequence[TaskFile],
            picks: dict[str, list[int]] | None, *, max_length: int, batch_size: int,
            device: str) -> _Recorded:
    """Run lm-eval's ``HFLM`` on ``tasks`` (the documents ``picks`` names, or all), keeping
    every answer under its task and true document id."""
    rec = _Recorded()
    tok = eval_tokenizer(tokenizer)

    def hflm() -> Any:
        from lm_eval.models.huggingface import HFLM

        class Recording(HFLM):  # type: ignore[misc, valid-type]
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
        # with ``samples`` lm-eval numbers the chosen documents 0, 1, ... in their order
        doc = picks[r.task_name][r.doc_id] if picks is not None else r.doc_id
        rec.answers[r.task_name][(doc, r.idx)] = (ll, greedy)
        rec.tokens += request_tokens(tok, r)

    evaluate_lm(hflm, tasks, samples=picks)  # log-likelihoods only: no generation settings
    return rec


def _replay_lm(answers: Mapping[str, np.ndarray], tokenizer: Any) -> Any:
    from lm_eval.api.model import LM

    class Replay(LM):  # type: ignore[misc, valid-type]
        """An lm-eval model that answers each request with the row the answers hold for it."""

        def __init__(self) -> None:
            super().__init__()
            self.keys: dict[str, list[Key]] = {}
            self.tokens = 0

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
            return [(float(a[0]), bool(a[1])) for a in self._rows(requests)]

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list:
            return [float(a[0]) for a in self._rows(requests)]

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list:
            raise AnswerMismatch("generate_until requests are not answered in eval leases")

    return Replay()


def _rows(answers: Mapping[Key, tuple[float, bool]]) -> np.ndarray:
    return np.array([[ll, float(greedy)] for _, (ll, greedy) in sorted(answers.items())],
                    dtype=np.float64).reshape(-1, 2)


def _only_leased(tasks: Sequence[TaskFile]) -> None:
    for t in tasks:
        if t.config.get("output_type") not in LEASED_TYPES:
            raise AtomError(f"task {t.name!r} is a {t.config.get('output_type')} task: eval "
                            f"leases answer {', '.join(LEASED_TYPES)} tasks only")
