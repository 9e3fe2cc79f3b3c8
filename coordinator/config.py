"""The run's typed configuration, read from ``run.toml`` and validated on load.

Every default lives in the section dataclasses below, and only here: the demo, the benchmarks
(``bench/diloco_sim.py`` reads ``RunConfig()``) and ``docs/configuration.md`` (checked by a
test) all take them from ``RunConfig``. ``default_config_text`` renders them, with each field's
help text, as the commented TOML that ``atom-coordinator init`` writes. Every mistake raises
one ``ConfigError`` line that names the file and the key, e.g.
``run.toml: [train].inner_steps must be a positive integer, got 'ten'``.

The training defaults were measured for the CPU demo (3 nodes, 1 torch thread each, a 2-core
machine) with ``bench/diloco_sim.py`` (3 workers, stdlib corpus, shuffled shards):

- one shard (240 steps x 8 x 128 tokens) on one thread: 8.1-9.1 s alone, 13-14 s with three
  such processes at once;
- validation loss (nats/byte) per round, init 5.43: outer (lr 1.0, momentum 0.0) 2.70, 2.46,
  2.31; DiLoCo's (0.7, 0.9) 2.85, 2.74, 2.62 (over 8 rounds of 131k-token shards the two end
  level: 2.04 vs 2.08). Nesterov momentum's first step moves 1.33x the averaged update, which
  overshoots while the model is this young, so the demo uses plain averaging. Over 4 rounds
  (2026-12-03): (1.0, 0.0) 2.25, (1.0, 0.5) 2.34, (0.7, 0.9) 2.38, (1.5, 0.0) 2.39,
  (2.0, 0.0) 3.51; synchronous data-parallel on the same tokens 2.02;
- tiny with 2 layers beat 4 layers at equal wall time (2.51 vs 2.74 after 3 chained shards):
  more steps matter more than depth at this budget; lr 1.5e-3 beat 3e-3 and 6e-3, and a
  per-lease warm-up + cosine decay did not help.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.aggregators import available_aggregators
from protocol.compression import SCHEMES, Compression
from protocol.errors import ConfigError
from training.families import BYTE_VOCAB, FAMILIES, ArchError, run_spec
from training.manifest import check_licence

__all__ = [
    "RunParams", "ModelParams", "DataParams", "TrainParams", "OuterParams", "AggregationParams",
    "VerifyParams", "CreditsParams", "NetworkParams", "AsyncParams", "EvalParams", "LedgerParams",
    "RunConfig", "load_config", "parse_config", "default_config_text",
]

# A check returns the cleaned value or raises _Bad(what the value must be).
Check = Callable[[Any], Any]


class _Bad(Exception):
    pass


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # TOML `true` is not a count


def _int(what: str, low: int, high: float = math.inf) -> Check:
    def check(v: Any) -> int:
        if not _is_int(v) or not low <= v <= high:
            raise _Bad(what)
        return int(v)
    return check


def _float(what: str, ok: Callable[[float], bool]) -> Check:
    def check(v: Any) -> float:
        if not (_is_int(v) or isinstance(v, float)) or not math.isfinite(v) or not ok(v):
            raise _Bad(what)
        return float(v)
    return check


def _optional(inner: Check) -> Check:
    # TOML has no null: an absent key is the only way to say "no override"
    return lambda v: None if v is None else inner(v)


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Bad("must be true or false")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise _Bad("must be a non-empty string")
    return v


def _run_id(v: Any) -> str:
    # used in file names, ledger rows and lease seeds: keep it plain
    if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", v):
        raise _Bad("must be 1-64 letters, digits, '.', '_' or '-'")
    return v


def _method(v: Any) -> str:
    names = available_aggregators()
    if v not in names:
        raise _Bad(f"must be one of {', '.join(names)}")
    return str(v)


def _mirrors(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(
            isinstance(u, str) and re.fullmatch(r"https?://[^\s]+", u) for u in v):
        raise _Bad('must be a list of http(s) URLs, e.g. ["https://mirror.example.edu/atom"]')
    return tuple(v)


def _metrics_address(v: Any) -> str:
    if v == "":
        return v
    if not isinstance(v, str) or not re.fullmatch(r"[^\s:]+:\d{1,5}", v) \
            or not 0 < int(v.rpartition(":")[2]) < 65536:
        raise _Bad('must be "HOST:PORT" (e.g. "127.0.0.1:9094") or "" (off)')
    return v


def _ledger_url(v: Any) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"[a-z][a-z0-9+]*://.*", v):
        raise _Bad("must be a database URL such as sqlite:///ledger.db")
    return v


def _licence(v: Any) -> str:
    if v == "":
        return v  # required for a folder source: checked in parse_config, which sees the folder
    if not isinstance(v, str):
        raise _Bad("must be an SPDX licence expression such as \"CC-BY-4.0\"")
    try:
        return check_licence(v)
    except ValueError as e:
        raise _Bad(str(e)) from None


def _tokenizer(v: Any) -> str:
    if not isinstance(v, str) or not (v in ("byte", "bpe") or v.endswith(".json")):
        raise _Bad('must be "byte", "bpe" or the path of a tokenizer.json')
    return v


def _family(v: Any) -> str:
    if v not in FAMILIES:
        raise _Bad(f"must be one of {', '.join(FAMILIES)}")
    return str(v)


def _overrides(v: Any) -> tuple[tuple[str, Any], ...]:
    # which keys a family takes is checked in _build, which knows the family
    if not isinstance(v, dict) or not all(
            isinstance(x, (int, float, bool)) for x in v.values()):
        raise _Bad("must be a table of numbers and booleans, e.g. { num_hidden_layers = 4 }")
    return tuple(sorted(v.items()))  # hashable, as a frozen section's fields are


_positive_int = _int("must be a positive integer", 1)
_non_negative_int = _int("must be a non-negative integer", 0)
_port = _int("must be a port number 1-65535", 1, 65535)
_positive = _float("must be a positive number", lambda x: x > 0)
_non_negative = _float("must be a non-negative number", lambda x: x >= 0)
_momentum = _float("must be in [0, 1)", lambda x: 0 <= x < 1)
_trim_fraction = _float("must be in [0, 0.5)", lambda x: 0 <= x < 0.5)


def _opt(default: Any, check: Check, doc: str, placeholder: str = "<integer>") -> Any:
    # placeholder: what run.toml shows for an optional key left unset
    return field(default=default, metadata={"check": check, "doc": doc,
                                            "placeholder": placeholder})


@dataclass(frozen=True)
class RunParams:
    id: str = _opt("atom-demo", _run_id, "name of this training run")
    rounds: int = _opt(3, _positive_int, "outer rounds (model versions) to train")
    min_nodes: int = _opt(1, _positive_int, "nodes that must be online before a round starts")
    wait_for_nodes_s: float = _opt(120.0, _non_negative, "how long to wait for min_nodes")


@dataclass(frozen=True)
class ModelParams:
    family: str = _opt("gpt", _family, "gpt (the built-in nanoGPT), or a transformers model "
                       "built from its config: llama, qwen2, gpt2 (training/families.py)")
    preset: str = _opt("tiny", _str, "gpt: training.model.PRESETS: tiny (CPU demo), small, "
                       "gpt2; llama/qwen2/gpt2: tiny, small, 124m, 1b")
    overrides: tuple[tuple[str, Any], ...] | None = _opt(
        None, _optional(_overrides), "llama/qwen2/gpt2: config keys on top of the preset, e.g. "
        "{ num_hidden_layers = 4, rope_theta = 500000.0 } (training.families.HF_KEYS)",
        placeholder="{ <key> = <value>, ... }")
    n_layer: int | None = _opt(None, _optional(_positive_int), "override the preset's layers")
    n_head: int | None = _opt(None, _optional(_positive_int), "override attention heads")
    n_embd: int | None = _opt(None, _optional(_positive_int), "override the embedding width")
    block_size: int | None = _opt(None, _optional(_positive_int), "override the context length")

    def gpt_dims(self) -> dict[str, int]:
        """The built-in GPT's overrides of its preset that are set."""
        return {k: v for k in ("n_layer", "n_head", "n_embd", "block_size")
                if (v := getattr(self, k)) is not None}


@dataclass(frozen=True)
class DataParams:
    source: str = _opt("stdlib", _str,
                       '"stdlib" (Python stdlib source), a folder of .txt/.md/.py/.jsonl/'
                       '.parquet files, or a datasets dataset saved with save_to_disk')
    licence: str = _opt("", _licence, 'SPDX licence of the source, e.g. "CC-BY-4.0" or '
                        '"LicenseRef-mine"; required unless source = "stdlib" (PSF-2.0)')
    text_column: str = _opt("text", _str, "the field of a .jsonl record, or the column of a "
                            ".parquet file or dataset, that holds a document's text")
    tokenizer: str = _opt("byte", _tokenizer, '"byte" (256 byte tokens), "bpe" (byte-level '
                          'BPE trained on the corpus at init) or the path of a tokenizer.json')
    vocab_size: int = _opt(4096, _int(f"must be an integer in 257..{1 << 32}", 257, 1 << 32),
                           'tokenizer = "bpe": tokens in the trained vocabulary')
    max_bytes: int = _opt(8_000_000, _positive_int, "read at most this many bytes of text")
    val_every: int = _opt(20, _int("must be an integer >= 2", 2),
                          "every N-th file goes to validation")
    shard_tokens: int = _opt(0, _non_negative_int,
                             "tokens per train shard; 0 = inner_steps * batch_size * seq_len")
    eval_tokens: int = _opt(32_768, _positive_int, "validation tokens evaluated per round")


@dataclass(frozen=True)
class TrainParams:
    # Training defaults: tune them here, nowhere else.
    inner_steps: int = _opt(240, _positive_int, "H: local AdamW steps per shard")
    batch_size: int = _opt(8, _positive_int, "sequences per inner step")
    seq_len: int = _opt(128, _positive_int, "tokens per sequence (<= the model's block_size)")
    lr: float = _opt(1.5e-3, _positive, "inner AdamW learning rate")
    weight_decay: float = _opt(0.1, _non_negative, "inner AdamW weight decay")
    deadline_s: float = _opt(300.0, _positive, "seconds a node has to return a shard (a "
                             "node's first lease, or every lease when target_lease_s = 0)")
    threads: int = _opt(1, _positive_int, "torch threads per local node process")
    # work sized to each node (coordinator/run/sizing.py)
    target_lease_s: float = _opt(0.0, _non_negative, "seconds a train lease should take on "
                                 "its node: inner steps from the node's measured tokens/s "
                                 "(its first lease is inner_steps); 0 = every lease inner_steps")
    min_inner_steps: int = _opt(20, _positive_int, "sized leases: fewest inner steps")
    max_inner_steps: int = _opt(2000, _positive_int, "sized leases: most inner steps")
    deadline_factor: float = _opt(3.0, _positive, "sized leases: deadline = factor x the "
                                  "expected training time + deadline_slack_s")
    deadline_slack_s: float = _opt(60.0, _non_negative, "sized leases: seconds for fetch, "
                                   "upload and delivery on top of the training time")


@dataclass(frozen=True)
class OuterParams:
    lr: float = _opt(1.0, _positive, "outer SGD learning rate (DiLoCo: 0.7)")
    momentum: float = _opt(0.0, _momentum, "outer Nesterov momentum in [0, 1) (DiLoCo: 0.9, which pays off after ~8+ rounds; 0 = plain model averaging, best for short runs)")
    nesterov: bool = _opt(True, _bool, "Nesterov momentum (as in DiLoCo)")


@dataclass(frozen=True)
class AggregationParams:
    # Defaults match the aggregators' own (a unit test checks); README "Robust aggregation".
    method: str = _opt("mean", _method, "how accepted pseudo-gradients are combined: "
                       f"{', '.join(available_aggregators())} (README: Robust aggregation)")
    trim_fraction: float = _opt(0.2, _trim_fraction, "trimmed_mean: share of the largest and "
                                "of the smallest values dropped per coordinate, in [0, 0.5)")
    clip_radius: float = _opt(0.0, _non_negative, "centered_clip: L2 clipping radius over a "
                              "whole update; 0 = the median distance from the start point")
    iterations: int = _opt(3, _positive_int, "centered_clip: clipping iterations per round")
    clip_from_previous: bool = _opt(False, _bool, "centered_clip: start from the previous "
                                    "round's result instead of the coordinate-wise median")


_fraction = _float("must be in [0, 1]", lambda x: 0 <= x <= 1)
_norm_factor = _float("must be 0 (off) or a number > 1", lambda x: x == 0 or x > 1)


@dataclass(frozen=True)
class VerifyParams:
    # README "How a round works" step 3; the round-level rules live in verify/rules.py.
    max_update_norm: float = _opt(1000.0, _positive, "reject pseudo-gradients with a larger L2 "
                                  "norm (an absolute cap, checked on every update)")
    norm_factor: float = _opt(3.0, _norm_factor, "reject an update whose L2 norm is more than "
                              "this many times the round's median update norm, or less than "
                              "the median over it (rounds of 3+ updates); 0 = off")
    reject_duplicates: bool = _opt(True, _bool, "reject an update whose arrays another node "
                                   "already sent this round, or that was accepted before")
    usefulness_tokens: int = _opt(4096, _non_negative_int, "tokens of held-out validation data "
                                  "and of the update's own shard on which the coordinator "
                                  "scores base - update against base; 0 = off")
    usefulness_tolerance: float = _opt(2.0, _non_negative, "nats: reject an update whose "
                                       "held-out improvement is below min(0, the round's "
                                       "median) by more than this")
    min_improvement: float = _opt(0.01, _non_negative, "nats: reject an update that lowers "
                                  "the loss on its own shard by less than this (free riders)")
    min_improvement_fraction: float = _opt(0.05, _fraction, "reject an update that lowers "
                                           "the loss on its own shard by less than this "
                                           "fraction of the round's median such improvement")
    check_processes: int = _opt(1, _non_negative_int, "processes beside the run loop that "
                                "run each train reply's own checks (the base check, the "
                                "usefulness scores), so a node that answers never waits for "
                                "another's scores before its next lease; 0 = in the loop")
    base_loss_tolerance: float = _opt(0.002, _non_negative, "nats: reject an update whose "
                                      "reported loss_before differs by more than this from the "
                                      "coordinator's loss of the lease's base on the same first "
                                      "batch (work not started from that base); 0 = off")
    spot_check_rate: float = _opt(0.1, _fraction, "chance that a train shard is also leased to "
                                  "a second node to compare (raised for nodes of low trust); "
                                  "0 = off")
    spot_check_tolerance: float = _opt(0.1, _positive, "relative L2 distance within which two "
                                       "results of the same shard agree")
    spot_check_loss_tolerance: float = _opt(0.02, _non_negative, "nats: on a spot-check "
                                            "mismatch a result also stands if its local "
                                            "model's loss on the shard is this close to the "
                                            "coordinator's recomputation (bf16 vs fp32 "
                                            "training diverges in parameters, not in loss); "
                                            "0 = parameters only")
    trust_weighting: bool = _opt(False, _bool, "scale each update's aggregation weight by its "
                                 "node's trust score")
    # Eval replies commit to a loss per window (coordinator.verify.eval_judge; README "Evaluation").
    eval_check_windows: int = _opt(2, _non_negative_int, "windows of every eval reply the "
                                   "coordinator recomputes, drawn at random; 0 = off")
    eval_check_fraction: float = _opt(0.0, _fraction, "recompute at least this fraction of "
                                      "an eval reply's windows (the larger of the two counts)")
    eval_tolerance: float = _opt(0.01, _positive, "an eval window agrees with a recomputation "
                                 "(or a quorum partner) if its mean loss is within this "
                                 "fraction of it, or of 1 nat below 1 nat (fp32 vs bf16: "
                                 "<= 0.07% measured)")
    eval_quorum_rate: float = _opt(0.1, _fraction, "chance that an eval shard is also leased "
                                   "to a node of another institution to compare; 0 = off")


def _scheme(v: Any) -> str:
    if v not in SCHEMES:
        raise _Bad(f"must be one of {', '.join(SCHEMES)}")
    return str(v)


def _broadcast(v: Any) -> str:
    if v not in ("none", "int8"):
        raise _Bad("must be none or int8")
    return str(v)


_topk_fraction = _float("must be in (0, 1]", lambda x: 0 < x <= 1)


@dataclass(frozen=True)
class CompressionParams:
    # protocol/compression.py; README "Compressed updates"
    scheme: str = _opt("int8", _scheme, "how nodes encode train updates: none (fp32), int8 "
                       "(blockwise absmax, 3.9x less) or topk (largest values only, with "
                       "error feedback on the node)")
    block: int = _opt(256, _int("must be an integer in 1..1048576", 1, 1 << 20),
                      "int8: values per scale")
    fraction: float = _opt(0.01, _topk_fraction, "topk: share of each array's values sent")
    error_feedback: bool = _opt(False, _bool, "topk: nodes carry what top-k dropped into their "
                                "next update (needs [verify] spot_check_rate = 0: an update "
                                "that depends on a node's history cannot be spot-checked)")
    broadcast: str = _opt("int8", _broadcast, "how a new model version reaches nodes holding "
                          "the previous one: int8 (the version is made as previous + the "
                          "int8-encoded change, and travels as that change: 3.9x less) or "
                          "none (always whole)")


@dataclass(frozen=True)
class CreditsParams:
    train_per_1k_tokens: float = _opt(1.0, _non_negative, "credits per 1000 tokens trained")
    eval_per_1k_tokens: float = _opt(0.1, _non_negative, "credits per 1000 tokens evaluated")
    mismatch_penalty: float = _opt(10.0, _non_negative, "a train update that loses a spot "
                                   "check (the coordinator's recomputation disagrees) costs "
                                   "this many times what it would have earned; at least "
                                   "1 / spot_check_rate makes cheating lose in expectation; "
                                   "0 = it just earns nothing")


@dataclass(frozen=True)
class NetworkParams:
    host: str = _opt("127.0.0.1", _str, "address the coordinator listens on")
    fleet_port: int = _opt(9092, _port, "Flower Fleet API port (faces nodes)")
    coordinator_port: int = _opt(9093, _port, "enrollment/status gRPC port (faces nodes)")
    public_host: str = _opt("127.0.0.1", _str, "address nodes use to reach this machine")
    blob_mirrors: tuple[str, ...] = _opt((), _mirrors, "HTTP(S) mirrors nodes try before the "
                                         "coordinator for model versions and shards (files "
                                         "named by digest: untrusted, every blob is checked)")
    metrics_address: str = _opt("127.0.0.1:9094", _metrics_address, "HOST:PORT of the "
                                "Prometheus /metrics endpoint (docs/operations.md); loopback "
                                "unless you open it on purpose; \"\" = off")


@dataclass(frozen=True)
class AsyncParams:
    # The asynchronous loop (coordinator/run/async_loop.py; docs/training.md "Asynchronous").
    enabled: bool = _opt(False, _bool, "train without round barriers: a node gets its next "
                         "lease as soon as it can take one and an outer step is applied "
                         "whenever enough verified updates are buffered")
    buffer: int = _opt(0, _non_negative_int, "updates per outer step (K); 0 = the number of "
                       "nodes online when the step's buffer opens")
    max_wait_s: float = _opt(600.0, _positive, "apply an outer step with fewer than K updates "
                             "once the oldest buffered one has waited this long")
    max_staleness: int = _opt(4, _non_negative_int, "reject an update built on a version more "
                              "than this many versions behind the current one (stale_base); "
                              "the coordinator keeps that many old versions to check against")
    staleness_power: float = _opt(0.5, _non_negative, "an update tau versions behind weighs "
                                  "(1 + tau) ** -staleness_power in its outer step")
    queue: int = _opt(0, _non_negative_int, "train leases queued on a node behind the one it "
                      "works on: hides the gap between a reply and the next lease, but each "
                      "queued lease starts on an older version (bench/fleet.py: 1 cost ~6% "
                      "in loss at equal tokens against 0)")
    eval_every: int = _opt(1, _positive_int, "evaluate every N-th version (the last always)")
    fill: bool = _opt(True, _bool, "at the last outer step, a node that would sit idle "
                      "while the step waits for slower nodes' work gets a lease sized to end "
                      "with theirs (its update joins the step); false = it waits")


@dataclass(frozen=True)
class EvalParams:
    # Benchmark tasks beside the validation loss (training/evals; docs/evals.md).
    tasks: str | None = _opt(None, _optional(_str), "folder of lm-evaluation-harness task "
                             "YAML files and their JSONL data (relative to the run directory): "
                             "nodes run its log-likelihood tasks in eval leases, and "
                             "`atom-coordinator eval-tasks` runs any of them on a version",
                             placeholder='"<folder>"')
    tasks_every: int = _opt(0, _non_negative_int, "with tasks: a node also runs them on every "
                            "N-th version (0: on the last version only)")
    tasks_check_docs: int = _opt(2, _positive_int, "documents per task whose answers the "
                                 "coordinator recomputes to check a node's tasks reply")
    tasks_deadline_s: float = _opt(900.0, _positive, "seconds a node has to answer a tasks "
                                   "lease")


@dataclass(frozen=True)
class LedgerParams:
    url: str = _opt("sqlite:///ledger.db", _ledger_url,
                    "sqlite:///file.db (relative to the run directory) or postgresql://...")


_SECTIONS: dict[str, type] = {
    "run": RunParams, "model": ModelParams, "data": DataParams, "train": TrainParams,
    "outer": OuterParams, "aggregation": AggregationParams, "verify": VerifyParams,
    "compression": CompressionParams, "credits": CreditsParams, "network": NetworkParams,
    "async": AsyncParams, "eval": EvalParams, "ledger": LedgerParams,
}
# run.toml sections whose RunConfig field is named otherwise (``async`` is a Python keyword)
_FIELDS = {"async": "asynchronous"}


@dataclass(frozen=True)
class RunConfig:
    run: RunParams = field(default_factory=RunParams)
    model: ModelParams = field(default_factory=ModelParams)
    data: DataParams = field(default_factory=DataParams)
    train: TrainParams = field(default_factory=TrainParams)
    outer: OuterParams = field(default_factory=OuterParams)
    aggregation: AggregationParams = field(default_factory=AggregationParams)
    verify: VerifyParams = field(default_factory=VerifyParams)
    compression: CompressionParams = field(default_factory=CompressionParams)
    credits: CreditsParams = field(default_factory=CreditsParams)
    network: NetworkParams = field(default_factory=NetworkParams)
    asynchronous: AsyncParams = field(default_factory=AsyncParams)  # [async]
    eval: EvalParams = field(default_factory=EvalParams)
    ledger: LedgerParams = field(default_factory=LedgerParams)
    # where run.toml lives: relative paths in it resolve here; not part of the config's value
    base_dir: Path = field(default=Path("."), compare=False, repr=False)

    @property
    def shard_tokens(self) -> int:
        """Tokens per train shard, with 0 resolved to inner_steps * batch_size * seq_len."""
        t = self.train
        return self.data.shard_tokens or t.inner_steps * t.batch_size * t.seq_len

    def codec(self) -> Compression:
        """The ``[compression]`` section as the wire's ``protocol.compression.Compression``."""
        c = self.compression
        return Compression(c.scheme, c.block, float(c.fraction), c.error_feedback)

    def data_folder(self, run_dir: str | Path | None = None) -> Path | None:
        """The corpus folder (relative paths against the run directory); None for stdlib."""
        if self.data.source == "stdlib":
            return None
        root = Path(run_dir) if run_dir is not None else self.base_dir
        return root / Path(self.data.source).expanduser()

    def data_tokenizer(self, run_dir: str | Path | None = None) -> str:
        """``[data].tokenizer``: "byte", "bpe", or the tokenizer.json's path (relative paths
        against the run directory)."""
        if self.data.tokenizer in ("byte", "bpe"):
            return self.data.tokenizer
        root = Path(run_dir) if run_dir is not None else self.base_dir
        return str(root / Path(self.data.tokenizer).expanduser())

    def eval_tasks(self, run_dir: str | Path | None = None) -> Path | None:
        """``[eval].tasks`` as a path (relative ones against the run directory); None when
        unset."""
        if self.eval.tasks is None:
            return None
        root = Path(run_dir) if run_dir is not None else self.base_dir
        return root / Path(self.eval.tasks).expanduser()

    def ledger_url(self, run_dir: str | Path | None = None) -> str:
        """The ledger URL, with a relative SQLite path made absolute against ``run_dir``
        (default: the directory run.toml was read from)."""
        url = self.ledger.url
        prefix = "sqlite:///"
        if not url.startswith(prefix):
            return url
        path, sep, query = url[len(prefix):].partition("?")
        if path in ("", ":memory:") or Path(path).is_absolute():
            return url
        root = Path(run_dir) if run_dir is not None else self.base_dir
        return f"{prefix}{(root / path).resolve()}{sep}{query}"


def _section(name: str, cls: type, table: Any, fname: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{fname}: [{name}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(f"{fname}: unknown key [{name}].{key}")
        try:
            values[key] = fields[key].metadata["check"](value)
        except _Bad as bad:
            raise ConfigError(f"{fname}: [{name}].{key} {bad}, got {value!r}") from None
    return cls(**values)


def _build(doc: dict[str, Any], base_dir: Path, fname: str) -> RunConfig:
    sections = {}
    for key, table in doc.items():
        if key not in _SECTIONS:
            raise ConfigError(f"{fname}: unknown section [{key}]")
        sections[_FIELDS.get(key, key)] = _section(key, _SECTIONS[key], table, fname)
    cfg = RunConfig(**sections, base_dir=base_dir)
    m, n = cfg.model, cfg.network
    if m.n_head is not None and m.n_embd is not None and m.n_embd % m.n_head:
        raise ConfigError(f"{fname}: [model].n_embd must be divisible by [model].n_head, "
                          f"got {m.n_embd} and {m.n_head}")
    if m.family != "gpt" or m.overrides:  # neither needs torch (the gpt presets do)
        try:  # the keys' checks do not depend on the vocabulary: the byte one stands in
            run_spec(m.family, m.preset, dict(m.overrides or ()), BYTE_VOCAB, m.gpt_dims())
        except ArchError as err:
            raise ConfigError(f"{fname}: [model].{err.key} {err.what}") from None
    c = cfg.compression
    if c.scheme == "topk" and c.error_feedback and cfg.verify.spot_check_rate > 0:
        raise ConfigError(f"{fname}: [compression].error_feedback needs [verify]."
                          "spot_check_rate = 0: an update that carries a node's earlier "
                          "residuals cannot be reproduced by a spot check")
    t = cfg.train
    if t.min_inner_steps > t.max_inner_steps:
        raise ConfigError(f"{fname}: [train].min_inner_steps must be <= max_inner_steps, "
                          f"got {t.min_inner_steps} and {t.max_inner_steps}")
    if n.fleet_port == n.coordinator_port:
        raise ConfigError(f"{fname}: [network].coordinator_port must differ from "
                          f"[network].fleet_port, got {n.coordinator_port}")
    return cfg


def parse_config(text: str, base_dir: str | Path = ".", *, name: str = "run.toml") -> RunConfig:
    """Parse and validate run.toml ``text``; relative paths resolve against ``base_dir``,
    ``name`` prefixes error messages."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        at = re.search(r" \(at line (\d+), column \d+\)$", msg)
        where = f" at line {at.group(1)}" if at else ""
        raise ConfigError(f"{name}: invalid TOML{where}: {msg[:at.start()] if at else msg}") from None
    cfg = _build(doc, Path(base_dir), name)
    folder = cfg.data_folder()
    if folder is not None and not folder.is_dir():
        raise ConfigError(f"{name}: [data].source must be \"stdlib\" or an existing folder, "
                          f"got {cfg.data.source!r}")
    if folder is not None and not cfg.data.licence:
        raise ConfigError(f"{name}: [data].licence is required for the source "
                          f"{cfg.data.source!r}: its SPDX licence id, e.g. \"CC-BY-4.0\" "
                          "(LicenseRef-<name> for a licence of your own)")
    return cfg


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a run.toml file; errors name ``path``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    return parse_config(text, path.parent, name=str(path))


def _toml_value(v: Any) -> str:
    if isinstance(v, dict):  # an inline table
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return f"{v:_}" if abs(v) >= 10_000 else str(v)
    if isinstance(v, float):
        return repr(v)
    return json.dumps(str(v), ensure_ascii=False)  # a JSON string is a valid TOML basic string


def default_config_text(**overrides: Any) -> str:
    """The commented run.toml that ``init`` writes: defaults, with ``overrides`` given as
    ``section_key=value`` (``run_id="x"``, ``network_fleet_port=9100``, ``model_n_layer=6``).

    Raises ConfigError on an unknown override or a value that does not validate.
    """
    chosen: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    for arg, value in overrides.items():
        section, _, key = arg.partition("_")
        if section not in _SECTIONS or key not in {f.name for f in dataclasses.fields(_SECTIONS[section])}:
            raise ConfigError(f"default_config_text: unknown override {arg!r}")
        chosen[section][key] = value
    lines = ["# ATOM Network run configuration, validated on load; every key is optional."]
    for section, cls in _SECTIONS.items():
        lines += ["", f"[{section}]"]
        for f in dataclasses.fields(cls):
            value = chosen[section].get(f.name, f.default)
            doc = f.metadata["doc"]
            if value is None:  # an optional override left unset: show the key, commented out
                lines.append(f"# {f.name} = {f.metadata['placeholder']}  # {doc}")
            else:
                lines.append(f"{f.name} = {_toml_value(value)}  # {doc}")
    text = "\n".join(lines) + "\n"
    # never write a file that fails to load (the data folder may not exist yet, so not checked)
    _build(tomllib.loads(text), Path("."), "default_config_text")
    return text
