"""``atom-coordinator eval-tasks``: lm-evaluation-harness tasks run on a model version by the
coordinator (the harness and the task folder live in ``training.evals``, shared with the
nodes' eval leases). The scores go to the ledger's ``task_scores`` and from there into an
export's model card.
"""
