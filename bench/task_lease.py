"""What a tasks lease costs: the node's answers, the coordinator's judgement, against a direct
lm-eval run of the same tasks on the same model, in one process.

Builds a model of ``--preset`` (random weights: the cost does not depend on them) and the
byte tokenizer, packs and unpacks ``--tasks`` (default: docs/tasks), then times, medians of
``--repeats`` after one warm-up (lm-eval's import and first run are paid there):

- ``direct_s``: ``training.evals.harness.run_tasks`` (what ``eval-tasks`` does on the coordinator);
- ``answer_s``: ``training.evals.answers.answer_tasks`` (the node's work: the same run, every
  answer kept);
- ``replay_s``: ``score_answers`` (the coordinator's lm-eval over the node's answers: no model);
- ``judge_s``: ``TaskJudge.check`` (replay + rebuilding the model + recomputing
  ``--check-docs`` documents per task).

    python bench/task_lease.py --json
    python bench/task_lease.py --preset small --check-docs 4 --json

Run on demand; ``--json`` prints one object last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(flag, "1")

from coordinator.verify.task_judge import TaskJudge  # noqa: E402
from training import tokenizer as tk  # noqa: E402
from training.evals.answers import answer_tasks, score_answers  # noqa: E402
from training.evals.bundle import pack_tasks, unpack_tasks  # noqa: E402
from training.evals.harness import run_tasks  # noqa: E402
from training.evals.tasks import load_tasks  # noqa: E402
from training.families import arch_of, spec_from_arch  # noqa: E402
from training.hf_convert import to_transformers  # noqa: E402
from training.model import PRESETS  # noqa: E402
from training.state import init_arrays  # noqa: E402


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(preset: str, tasks_dir: Path, repeats: int, check_docs: int, batch_size: int) -> dict:
    arch = arch_of(PRESETS[preset])
    arch["vocab_size"] = 256
    spec = spec_from_arch(arch)
    arrays = init_arrays(spec, seed=0)
    model, _ = to_transformers(arrays, arch)
    tok = tk.wrap_tokenizer(tk.parse_tokenizer(tk.byte_tokenizer_json(), "byte tokenizer"),
                            model_max_length=spec.block_size)
    with tempfile.TemporaryDirectory(prefix="atom-task-bench-") as folder:
        bundle = pack_tasks(load_tasks(tasks_dir))
        tasks = unpack_tasks(bundle, Path(folder))
        kw = dict(max_length=spec.block_size, batch_size=batch_size)
        direct = _median_s(lambda: run_tasks(model, tok, tasks, **kw), repeats)
        answer = _median_s(lambda: answer_tasks(model, tok, tasks, **kw), repeats)
        answers, tokens = answer_tasks(model, tok, tasks, **kw)
        replay = _median_s(lambda: score_answers(tasks, answers, tok), repeats)
        judge = TaskJudge(tasks, tok, arch, check_docs=check_docs, tolerance=0.01,
                          batch_size=batch_size)
        verdict = judge.check(arrays, answers, tokens, seed=0)
        if not verdict.accepted:
            raise SystemExit(f"the judge rejected honest answers: {verdict.detail}")
        judged = _median_s(lambda: judge.check(arrays, answers, tokens, seed=0), repeats)
    requests = sum(len(a) for a in answers.values())
    return {"preset": preset, "params": sum(a.size for a in arrays.values()),
            "tasks": len(tasks), "requests": requests, "tokens": tokens,
            "bundle_bytes": len(bundle), "answers_bytes": 16 * requests,
            "direct_s": round(direct, 3), "answer_s": round(answer, 3),
            "replay_s": round(replay, 3), "judge_s": round(judged, 3),
            "answer_over_direct": round(answer / direct, 3),
            "judge_over_answer": round(judged / answer, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--tasks", type=Path, default=ROOT / "docs" / "tasks")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--check-docs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    out = run(a.preset, a.tasks, a.repeats, a.check_docs, a.batch_size)
    print(f"{out['preset']} ({out['params']:,} parameters), {out['requests']} requests: "
          f"direct lm-eval {out['direct_s']:.2f} s, node answers {out['answer_s']:.2f} s, "
          f"replay {out['replay_s']:.2f} s, judge {out['judge_s']:.2f} s", file=sys.stderr)
    if a.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
