"""Benchmark tasks beside the validation loss: lm-evaluation-harness run on a model version.

``evaluate.eval_tasks`` wires ``atom-coordinator eval-tasks``; ``tasks`` reads and checks a
run's task folder (YAML + JSONL, nothing downloaded); ``harness`` runs lm-eval on the version
held in memory (lm_eval, torch, transformers: imported only by a measurement). The scores
go to the ledger's ``task_scores`` and from there into an export's model card.
"""
