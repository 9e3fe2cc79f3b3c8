"""A coordinator's run directory: what ``init`` creates and every other command reads.

::

    DIR/run.toml            the run's configuration (edit before ``start``)
    DIR/coordinator.key     signs receipts; its public half is pinned by nodes at join
    DIR/coordinator.pub.pem that public half as PEM, for ``openssl`` checks of receipts
    DIR/tls/                private CA + server certificate chain (CA hash goes into invites)
    DIR/ledger.db           the SQLite ledger (unless [ledger].url points elsewhere)
    DIR/corpus/             the token file the shards are cut from, its tokenizer.json and
                            data manifest (training.corpus; built by init, checked by start)
    DIR/checkpoints/        content-addressed model versions (safetensors + JSON meta)
    DIR/blobs/              what nodes fetch by digest: model versions, data shards
    DIR/logs/               SuperLink, Fleet proxy and ServerApp logs
    DIR/superlink.json      while running: the SuperLink's loopback (Control API) port
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from protocol.errors import ConfigError
from protocol.invite import InviteToken, hash_secret, new_secret
from protocol.signing import generate_key, load_private_key, public_key_pem, save_private_key

from coordinator.config import RunConfig, default_config_text, load_config, parse_config
from coordinator.ledger import Ledger
from coordinator.services.pki import TlsFiles, ca_sha256, make_pki, tls_files

if TYPE_CHECKING:
    from training.corpus import CorpusInfo, Progress

__all__ = ["RunDir", "init_run", "create_invite", "prepare_corpus"]


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def config_path(self) -> Path:
        return self.path / "run.toml"

    @property
    def key_path(self) -> Path:
        return self.path / "coordinator.key"

    @property
    def public_key_path(self) -> Path:
        return self.path / "coordinator.pub.pem"

    @property
    def tls(self) -> TlsFiles:
        return tls_files(self.path / "tls")

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def blobs(self) -> Path:
        return self.path / "blobs"

    @property
    def replies(self) -> Path:
        """Replies nodes handed in beside Flower (``coordinator.run.reply_spool``)."""
        return self.path / "replies"

    @property
    def next_work(self) -> Path:
        """Leases the loop issued, for nodes to take beside Flower (``WorkSpool``)."""
        return self.path / "next-work"

    @property
    def corpus(self) -> Path:
        return self.path / "corpus"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def config(self) -> RunConfig:
        if not self.config_path.exists():
            raise ConfigError(f"{self.path} is not a run directory (no run.toml): "
                              f"run `atom-coordinator init {self.path}` first")
        return load_config(self.config_path)

    def ledger(self, cfg: RunConfig | None = None) -> Ledger:
        cfg = cfg or self.config()
        return Ledger(cfg.ledger_url(self.path))

    def public_key_pem(self) -> bytes:
        return public_key_pem(load_private_key(self.key_path))

    def coordinator_address(self, cfg: RunConfig) -> str:
        return f"{cfg.network.public_host}:{cfg.network.coordinator_port}"

    def fleet_address(self, cfg: RunConfig) -> str:
        return f"{cfg.network.public_host}:{cfg.network.fleet_port}"


def init_run(path: Path, *, force: bool = False, **overrides: object) -> RunDir:
    """Create a run directory: config, coordinator key, PKI and an empty ledger."""
    rd = RunDir(path.resolve())
    if rd.config_path.exists() and not force:
        raise ConfigError(f"{rd.config_path} already exists (use --force to start over)")
    text = default_config_text(**overrides)
    # a bad override (a data folder without its licence...) fails before anything is written
    parse_config(text, rd.path, name=str(rd.config_path))
    rd.path.mkdir(parents=True, exist_ok=True)
    for sub in (rd.checkpoints, rd.corpus, rd.logs):
        sub.mkdir(exist_ok=True)
    rd.config_path.write_text(text)
    cfg = rd.config()
    key = generate_key()
    save_private_key(key, rd.key_path)
    # The key file is OpenSSH PEM (what Flower wants), which ``openssl`` cannot read: publish
    # the public half in the SubjectPublicKeyInfo PEM every tool reads.
    rd.public_key_path.write_bytes(public_key_pem(key))
    make_pki(rd.path / "tls", [cfg.network.public_host, cfg.network.host])
    # Creates the tables now (in whatever database [ledger].url names: no SQLite file is
    # left behind for a PostgreSQL run), so a bad URL fails at init.
    rd.ledger(cfg).close()
    return rd


def prepare_corpus(rd: RunDir, cfg: RunConfig | None = None, *,
                   on_progress: Progress | None = None) -> CorpusInfo:
    """Build (or reuse) the run's corpus as ``[data]`` says: tokens, tokenizer and manifest.

    ``CorpusInfo.tokenizer_sha256`` and ``manifest_sha256`` are what leases and the model
    card name; ``vocab_size`` is what the model's vocabulary must cover.
    """
    from training.corpus import build_corpus  # numpy: keep `invite` and friends light
    from training.manifest import STDLIB_LICENCE
    from training.sources import open_source, stdlib_source

    cfg = cfg or rd.config()
    d = cfg.data
    folder = cfg.data_folder(rd.path)
    source = stdlib_source() if folder is None else open_source(folder, d.text_column)
    licence = d.licence or (STDLIB_LICENCE if folder is None else "")
    return build_corpus(source, rd.corpus, licence=licence,
                        tokenizer=cfg.data_tokenizer(rd.path), vocab_size=d.vocab_size,
                        max_bytes=d.max_bytes, val_every=d.val_every, on_progress=on_progress)


def create_invite(rd: RunDir, institution: str, *, ttl_s: float = 7 * 24 * 3600) -> str:
    """Record a single-use invite for ``institution`` and return its token."""
    cfg = rd.config()
    secret = new_secret()
    with rd.ledger(cfg) as ledger:
        inst = ledger.add_institution(institution)
        ledger.create_invite(inst, hash_secret(secret), time.time() + ttl_s)
    token = InviteToken(address=rd.coordinator_address(cfg), secret=secret,
                        ca_sha256=ca_sha256(rd.tls.ca_cert.read_bytes()))
    return token.encode()
