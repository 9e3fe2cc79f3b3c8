"""lm-evaluation-harness tasks on a model version, wherever it runs (a node's eval lease, or
``atom-coordinator eval-tasks``).

``tasks`` reads and checks a task folder (YAML + JSONL, nothing downloaded); ``bundle`` packs
one as a content-addressed blob an eval lease names; ``harness`` runs lm-eval on a model held in
memory; ``answers`` keeps what the model answered request by request, so a coordinator can
score a node's answers with lm-eval itself and recompute a sample of them. lm_eval, torch and
transformers are imported only by a measurement.
"""
