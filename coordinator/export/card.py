"""Where an exported model came from: ``atom_provenance.json`` and the model card README.md.

Both are made from one ``Provenance``, read from the ledger and the run's corpus, so the card
cannot say anything the JSON does not:

- **contributions** per institution: accepted train and eval tokens, accepted updates and the
  sum of credit entries (penalties included), from the ledger's per-node summaries summed the
  way the leaderboard sums them (``coordinator.accounting.leaderboard``); institutions with
  no accepted update and no credit are left out; ordered by tokens trained, most first;
- the **data manifest** (``training.manifest``): each source's name, SPDX licence, digest,
  documents and tokens, and the manifest's SHA-256;
- the **version history** up to the exported version: updates aggregated, tokens, the
  validation loss (mean cross-entropy in nats per token on the run's validation split);
- the exported version's **task scores** (``atom-coordinator eval-tasks``,
  ``coordinator.evals``): per lm-eval task, metric and filter, the value, its stderr, the
  documents evaluated, the SHA-256 of the task's files and the harness that measured it;
  in the card's ``model-index`` too (those with a value);
- the exported version and its **model digest** (``protocol.digest.digest_arrays`` of its
  arrays, as the ledger records it);
- the **root of the Merkle tree over every credit receipt** and its size
  (``coordinator.accounting.receipt_tree``): ``atom-node credits --proof --root <root>``
  checks that each of a node's receipts is in it.

Contributions and the receipt tree are the ledger's at export time: a run still going on, or
an older version exported, shows the work done so far. The licence is the data manifest's (a
run declares no model licence of its own); several sources join their licences with ``AND``.
On the Hub's ``license:`` key a single SPDX id is written lower-case (``cc0-1.0``), anything
else as ``other`` with ``license_name``; the exact SPDX expression is in ``atom_network``.

``atom_provenance.json`` is canonical JSON (keys sorted, no spaces, ASCII, no NaN)::

    {"format": "atom-provenance-v1", "run_id", "version", "model_digest", "model" (the arch),
     "exported_as" (transformers class), "licence", "licence_from", "manifest_sha256",
     "tokenizer": {"kind", "sha256", "vocab_size"},
     "sources": [{"name", "licence", "digest", "documents", "tokens"}],
     "contributions": [{"institution", "nodes", "accepted_updates", "tokens_trained",
                        "tokens_evaluated", "credits"}],
     "versions": [{"version", "round", "updates", "tokens", "val_loss", "val_tokens",
                   "digest"}],
     "task_scores": [{"task", "metric", "filter", "value", "stderr", "n_samples",
                      "task_digest", "harness"}],
     "receipts": {"root", "tree_size"}}

``task_scores`` came after the format's first release: a reader of ``atom-provenance-v1``
takes an absent key as no scores.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from protocol._fields import canonical_json
from protocol.errors import ConfigError
from training.corpus import CorpusInfo

from coordinator.accounting.leaderboard import leaderboard
from coordinator.accounting.receipt_tree import receipt_tree
from coordinator.ledger.models import ModelVersion
from coordinator.ledger.reads import LedgerReads

__all__ = ["FORMAT", "LICENCE_FROM", "Contribution", "DataSource", "Provenance", "TaskScoreLine",
           "VersionLine", "model_card", "provenance"]

FORMAT = "atom-provenance-v1"
LICENCE_FROM = "data manifest"
METRIC = "validation loss (mean cross-entropy, nats per token)"
PROOF_COMMAND = "atom-node credits --proof --root {root}"


@dataclass(frozen=True)
class Contribution:
    institution: str
    nodes: int
    accepted_updates: int
    tokens_trained: int
    tokens_evaluated: int
    credits: float  # rounded to 6 decimals, as receipts and the leaderboard are


@dataclass(frozen=True)
class DataSource:
    name: str
    licence: str
    digest: str
    documents: int
    tokens: int


@dataclass(frozen=True)
class VersionLine:
    version: int
    round: int
    updates: int
    tokens: int
    val_loss: float | None
    val_tokens: int | None
    digest: str


@dataclass(frozen=True)
class TaskScoreLine:
    task: str
    metric: str
    filter: str
    value: float | None
    stderr: float | None
    n_samples: int
    task_digest: str
    harness: str


@dataclass(frozen=True)
class Provenance:
    run_id: str
    version: int
    model_digest: str
    model: dict[str, Any]  # the checkpoint's arch (training.families.arch_of)
    exported_as: str
    licence: str
    licence_from: str
    manifest_sha256: str
    tokenizer: dict[str, Any]
    sources: tuple[DataSource, ...]
    contributions: tuple[Contribution, ...]
    versions: tuple[VersionLine, ...]  # up to and including ``version``
    task_scores: tuple[TaskScoreLine, ...]  # of ``version``
    receipts_root: str
    receipts_tree_size: int

    @property
    def val_loss(self) -> float | None:
        return self.versions[-1].val_loss if self.versions else None

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["receipts"] = {"root": doc.pop("receipts_root"),
                           "tree_size": doc.pop("receipts_tree_size")}
        return {"format": FORMAT, **doc}

    def to_json(self) -> bytes:
        """The canonical bytes of ``atom_provenance.json``."""
        return canonical_json(self.to_dict())


def provenance(ledger: LedgerReads, corpus: CorpusInfo, *, run_id: str,
               rows: list[ModelVersion], model: dict[str, Any],
               exported_as: str) -> Provenance:
    """The provenance of the last of ``rows`` (the ledger's versions up to the exported one,
    the caller's read), from ``ledger`` now and ``corpus``'s manifest.

    Raises
    ------
    ConfigError
        If manifest.json is missing, unreadable or does not match corpus.json's SHA-256.
    """
    version = rows[-1].version
    versions = tuple(VersionLine(v.version, v.round, v.n_updates, int(v.tokens), v.val_loss,
                                 None if v.val_tokens is None else int(v.val_tokens), v.digest)
                     for v in rows)
    board = leaderboard(ledger.node_summaries(), run_id, time.time())
    contributions = sorted(
        (Contribution(s.institution, s.nodes or 0, s.accepted_updates, s.tokens_trained,
                      s.tokens_evaluated, s.credits)
         for s in board.institutions if s.accepted_updates or s.credits),
        key=lambda c: (-c.tokens_trained, -c.credits, c.institution))
    sources, manifest_sha = _sources(corpus)
    licences = list(dict.fromkeys(s.licence for s in sources))
    licence = (" AND ".join(f"({x})" if " " in x else x for x in licences) if licences
               else "NOASSERTION")
    tree = receipt_tree(ledger)
    scores = tuple(TaskScoreLine(r.task, r.metric, r.filter, r.value, r.stderr, r.n_samples,
                                 r.task_digest, r.harness)
                   for r in ledger.task_scores(version))
    return Provenance(
        run_id=run_id, version=version, model_digest=rows[-1].digest, model=dict(model),
        exported_as=exported_as, licence=licence, licence_from=LICENCE_FROM,
        manifest_sha256=manifest_sha,
        tokenizer={"kind": corpus.tokenizer_kind, "sha256": corpus.tokenizer_sha256,
                   "vocab_size": corpus.vocab_size},
        sources=sources, contributions=tuple(contributions), versions=versions,
        task_scores=scores, receipts_root=tree.root_hex, receipts_tree_size=tree.size)


def _sources(corpus: CorpusInfo) -> tuple[tuple[DataSource, ...], str]:
    if not corpus.manifest_sha256:  # a format-1 corpus: no manifest, no licence on record
        return (DataSource(corpus.source, "NOASSERTION", "", corpus.n_files,
                           corpus.n_tokens),), ""
    path = corpus.manifest_path
    try:
        raw = path.read_bytes()
    except OSError:
        raise ConfigError(f"corpus: {path} is missing or unreadable") from None
    if hashlib.sha256(raw).hexdigest() != corpus.manifest_sha256:
        raise ConfigError(f"corpus: {path} does not match the sha256 in corpus.json")
    try:
        doc = json.loads(raw)
        sources = tuple(DataSource(str(s["name"]), str(s["licence"]), str(s["digest"]),
                                   int(s["documents"]), int(s["tokens"]))
                        for s in doc["sources"])
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"corpus: {path} is not a data manifest ({e!r})") from None
    return sources, corpus.manifest_sha256


def _hub_licence(spdx: str) -> dict[str, str]:
    """The Hub's ``license`` keys for ``spdx``: see the module docstring."""
    single = " " not in spdx and "LicenseRef-" not in spdx and spdx != "NOASSERTION"
    if single:
        return {"license": spdx.lower()}
    return {"license": "other", "license_name": spdx.lower().replace(" ", "-")}


def model_card(p: Provenance) -> ModelCard:
    """The README.md of the export: YAML front matter for the Hub, and a body that lists the
    provenance (module docstring)."""
    name = f"{p.run_id}-v{p.version}"
    results = []
    if p.val_loss is not None:
        source = p.sources[0].name if p.sources else p.run_id
        results.append(EvalResult(
            task_type="text-generation", dataset_type="atom-corpus", dataset_name=source,
            dataset_split="validation", dataset_revision=p.manifest_sha256 or None,
            metric_type="loss", metric_name=METRIC, metric_value=p.val_loss))
    results += [EvalResult(
        task_type="text-generation", dataset_type=s.task, dataset_name=s.task,
        dataset_revision=s.task_digest, metric_type=s.metric,
        metric_name=s.metric if s.filter == "none" else f"{s.metric} ({s.filter})",
        metric_value=s.value) for s in p.task_scores if s.value is not None]
    family = p.model.get("family", "gpt")
    data = ModelCardData(
        model_name=name, eval_results=results or None, library_name="transformers",
        pipeline_tag="text-generation", datasets=[s.name for s in p.sources] or None,
        tags=["atom-network", "diloco", "federated-learning", family],
        atom_network={"run_id": p.run_id, "version": p.version,
                      "model_digest": p.model_digest, "licence": p.licence,
                      "licence_from": p.licence_from, "manifest_sha256": p.manifest_sha256,
                      "receipts_root": p.receipts_root,
                      "receipts_tree_size": p.receipts_tree_size},
        **_hub_licence(p.licence))
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_body(p, name)}")


def _body(p: Provenance, name: str) -> str:
    loss = "not evaluated" if p.val_loss is None else f"{p.val_loss:.4f}"
    lines = [
        f"# {name}",
        "",
        f"Version {p.version} of the ATOM Network run `{p.run_id}`: a "
        f"`{p.exported_as}` trained with DiLoCo by the institutions below, every update "
        "verified by the coordinator before it was aggregated. Validation loss: "
        f"{loss} ({METRIC}).",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'tok = AutoTokenizer.from_pretrained("path/to/this/folder")',
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
        'ids = tok("def main(", return_tensors="pt")',
        "print(tok.decode(model.generate(**ids)[0]))  # greedy; do_sample=True to sample",
        "```",
        "",
        "## Model",
        "",
        f"- run: `{p.run_id}`, version {p.version}",
        f"- model digest (SHA-256 of the version's arrays, as the ledger records it): "
        f"`{p.model_digest}`",
        f"- architecture: {_arch_text(p.model)}; exported as `{p.exported_as}`",
        f"- tokenizer: {p.tokenizer['kind']}, {p.tokenizer['vocab_size']:,} ids"
        + (f", tokenizer.json SHA-256 `{p.tokenizer['sha256']}`" if p.tokenizer["sha256"]
           else ""),
        f"- licence: {p.licence} (from the {p.licence_from})",
        "",
        *_scores_section(p),
        "## Contributors",
        "",
        "Verified work per institution, from the run's ledger at export time: tokens of "
        "accepted updates and the sum of their credits (penalties included).",
        "",
        "| institution | nodes | accepted updates | tokens trained | tokens evaluated "
        "| credits |",
        "|---|---:|---:|---:|---:|---:|",
        *(f"| {c.institution} | {c.nodes} | {c.accepted_updates:,} | {c.tokens_trained:,} "
          f"| {c.tokens_evaluated:,} | {c.credits:,.6f} |" for c in p.contributions),
        "",
        "## Training data",
        "",
        f"Data manifest SHA-256: `{p.manifest_sha256 or 'none (format-1 corpus)'}`.",
        "",
        "| source | licence | digest | documents | tokens |",
        "|---|---|---|---:|---:|",
        *(f"| {s.name} | {s.licence} | `{s.digest}` | {s.documents:,} | {s.tokens:,} |"
          for s in p.sources),
        "",
        "## Version history",
        "",
        "| version | made from updates | tokens | validation loss |",
        "|---:|---:|---:|---:|",
        *(f"| {v.version} | {v.updates} | {v.tokens:,} | "
          f"{'-' if v.val_loss is None else f'{v.val_loss:.4f}'} |" for v in p.versions),
        "",
        "## Credit receipts",
        "",
        "Every credit the run paid comes with a receipt signed by the coordinator. At export "
        f"the ledger held {p.receipts_tree_size:,} receipts; the root of the Merkle tree over "
        "them (RFC 6962 hashing, in ledger order) is:",
        "",
        "```",
        p.receipts_root,
        "```",
        "",
        "A contributor checks that each of its node's receipts is in this tree with:",
        "",
        "```",
        PROOF_COMMAND.format(root=p.receipts_root),
        "```",
        "",
        "`atom_provenance.json` beside this card holds the same numbers as canonical JSON.",
        "",
    ]
    return "\n".join(lines)


def _scores_section(p: Provenance) -> list[str]:
    """The version's task scores as a table, or nothing when none were measured."""
    if not p.task_scores:
        return []
    harness = ", ".join(sorted({s.harness for s in p.task_scores}))
    return [
        "## Task scores",
        "",
        f"Measured on this version with {harness} (`atom-coordinator eval-tasks`) on the "
        "run's task files, named by the SHA-256 of each task's YAML and data.",
        "",
        "| task | metric | filter | value | stderr | documents | task files |",
        "|---|---|---|---:|---:|---:|---|",
        *(f"| {s.task} | {s.metric} | {s.filter} | {_number(s.value)} | "
          f"{_number(s.stderr)} | {s.n_samples:,} | `{s.task_digest[:16]}` |"
          for s in p.task_scores),
        "",
    ]


def _number(x: float | None) -> str:
    return "-" if x is None else f"{x:.6g}"


def _arch_text(arch: dict[str, Any]) -> str:
    family = arch.get("family", "gpt")
    keys = ", ".join(f"{k} {v}" for k, v in sorted(arch.items()) if k != "family")
    return f"{family} ({keys})"
