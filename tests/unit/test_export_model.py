"""``atom-coordinator export-model``: a version as a Hugging Face folder that transformers loads
offline and that computes what the coordinator's model computes; its card's numbers are the
ledger's; every bad input is one line and a non-zero exit."""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from fake_network import enroll  # noqa: E402
from huggingface_hub import ModelCard  # noqa: E402
from loop_world import build_test_corpus, make_net  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from coordinator.accounting.credits import ReceiptIssuer  # noqa: E402
from coordinator.cli import app as coordinator_app  # noqa: E402
from coordinator.export.hf import gpt_to_gpt2  # noqa: E402
from coordinator.export.model_dir import export_model  # noqa: E402
from coordinator.ledger import Ledger  # noqa: E402
from coordinator.rundir import RunDir, init_run  # noqa: E402
from protocol.merkle import MerkleTree, leaf_hash  # noqa: E402
from protocol.receipts import RECEIPT_PREFIX  # noqa: E402
from training.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from training.corpus import CorpusInfo, build_folder_corpus  # noqa: E402
from training.families import HF_PRESETS, arch_of, spec_from_arch  # noqa: E402
from training.state import arrays_to_model, init_arrays  # noqa: E402

TINY_GPT = {"vocab_size": 256, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32}
SMALL = {"llama": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2,
                   "max_position_embeddings": 32},
         "qwen2": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2,
                   "max_position_embeddings": 32},
         "gpt2": {"n_embd": 32, "n_inner": 64, "n_layer": 2, "n_head": 4, "n_positions": 32}}
ARCHS = {
    "gpt": TINY_GPT,
    "gpt-bias": {**TINY_GPT, "bias": True},
    **{f: {"family": f, **HF_PRESETS[f]["tiny"], **SMALL[f]} for f in SMALL},
}


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing here may reach a hub: any connection attempt fails the test."""
    def refuse(*_: object) -> None:
        raise AssertionError("the export tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- run directories ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def byte_corpus(tmp_path_factory: pytest.TempPathFactory) -> CorpusInfo:
    return build_test_corpus(tmp_path_factory.mktemp("corpus"), files=10)


@pytest.fixture(scope="module")
def bpe_corpus(tmp_path_factory: pytest.TempPathFactory, byte_corpus: CorpusInfo) -> CorpusInfo:
    root = tmp_path_factory.mktemp("bpe")
    return build_folder_corpus(byte_corpus.path.parent / "text", root / "built", val_every=5,
                               licence="CC-BY-4.0", tokenizer="bpe", vocab_size=300)


def new_run(path: Path, corpus: CorpusInfo, run_id: str = "export-test") -> RunDir:
    rd = init_run(path, run_id=run_id)
    shutil.copytree(corpus.path, rd.corpus, dirs_exist_ok=True)
    return rd


def perturbed(arch: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    """Initial weights plus noise on every array (norm gains and biases too), so a wrong
    transpose or a dropped array shows in the logits."""
    rng = np.random.default_rng(seed)
    return {k: (a + 0.05 * rng.standard_normal(a.shape)).astype(np.float32)
            for k, a in init_arrays(spec_from_arch(arch), seed).items()}


def write_versions(rd: RunDir, arch: dict[str, Any], n: int = 2) -> list[dict]:
    """Versions 0..n-1 of ``arch`` straight into the run's checkpoints and ledger."""
    out = []
    with rd.ledger() as ledger:
        for v in range(n):
            arrays = perturbed(arch, v)
            path, digest = save_checkpoint(rd.checkpoints, arrays,
                                           {"version": v, "model": arch, "round": v})
            ledger.add_model_version(v, digest, str(path), v, n_updates=v, tokens=100 * v)
            if v:
                ledger.set_val_loss(v, 5.0 - v, 1024)
            out.append({"arrays": arrays, "path": path, "digest": digest})
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, byte_corpus: CorpusInfo) -> RunDir:
    """Two rounds of the real run loop over the fake network: three nodes of two
    institutions, receipts signed with the run's own key."""
    rd = new_run(tmp_path_factory.mktemp("trained") / "run", byte_corpus, "trained-run")
    with rd.ledger() as ledger:
        nodes = enroll(ledger, ["honest"], institution="Uni A")
        nodes += enroll(ledger, ["honest", "honest"], institution="Uni B", first=1)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    net = make_net(rd.path, byte_corpus, [], nodes=nodes, rounds=2, run_id="trained-run",
                   issuer=ReceiptIssuer.load(rd.key_path),
                   extra="[credits]\ntrain_per_1k_tokens = 2.0\neval_per_1k_tokens = 0.5\n")
    try:
        net.run()
    finally:
        net.ledger.close()
        torch.set_num_threads(before)
    return rd


# -- the model ---------------------------------------------------------------------------


def coordinator_logits(arrays: dict[str, np.ndarray], arch: dict[str, Any],
                       idx: torch.Tensor) -> torch.Tensor:
    model = arrays_to_model(arrays, spec_from_arch(arch)).eval()
    with torch.no_grad():
        return model(idx)[0]


def exported_logits(out: Path, idx: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        return model(input_ids=idx).logits


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_the_export_computes_the_coordinators_logits(tmp_path: Path, byte_corpus: CorpusInfo,
                                                     name: str) -> None:
    arch = arch_of(spec_from_arch(ARCHS[name]))
    rd = new_run(tmp_path / "run", byte_corpus)
    versions = write_versions(rd, arch)
    out = tmp_path / "out"
    done = export_model(rd, out, version=1)
    assert (done.version, done.digest) == (1, versions[1]["digest"])
    idx = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(0))
    want = coordinator_logits(versions[1]["arrays"], arch, idx)
    got = exported_logits(out, idx)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "README.md", "atom_provenance.json"} <= files
    config = json.loads((out / "config.json").read_text())
    want_class = "GPT2LMHeadModel" if name.startswith("gpt") else None
    if want_class:
        assert config["architectures"] == [want_class]
    if name.startswith("gpt-") or name == "gpt":
        assert config["activation_function"] == "gelu"  # nn.GELU(): erf, not tanh


def test_gpt_to_gpt2_transposes_linears_and_zero_fills_missing_biases() -> None:
    spec = spec_from_arch(TINY_GPT)
    arrays = perturbed(TINY_GPT, 3)
    out = gpt_to_gpt2(arrays, spec)
    w = arrays["transformer.h.0.attn.c_attn.weight"]  # Linear: (out, in) = (3n, n)
    assert out["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)
    np.testing.assert_array_equal(out["transformer.h.0.attn.c_attn.weight"], w.T)
    np.testing.assert_array_equal(out["transformer.h.1.mlp.c_fc.bias"], np.zeros(128))
    np.testing.assert_array_equal(out["transformer.ln_f.bias"], np.zeros(32))
    np.testing.assert_array_equal(out["transformer.wte.weight"], arrays["transformer.wte.weight"])


def test_it_loads_offline_and_generates_text(trained: RunDir, tmp_path: Path) -> None:
    out = tmp_path / "model"
    export_model(trained, out)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("The cat sat", return_tensors="pt")
    gen = model.generate(**ids)
    n_prompt = ids["input_ids"].shape[1]
    assert gen.shape[1] > n_prompt
    assert model.generation_config.do_sample is False
    text = tok.decode(gen[0])
    assert text.startswith("The cat sat") and len(text) > len("The cat sat")
    # the latest version's weights are what was exported
    with Ledger.read_only(f"sqlite:///{trained.path / 'ledger.db'}") as ledger:
        latest = ledger.latest_version()
    arrays, meta = load_checkpoint(latest.path)
    want = coordinator_logits(arrays, meta["model"], ids["input_ids"])
    assert torch.allclose(exported_logits(out, ids["input_ids"]), want, atol=1e-4, rtol=0)


def test_a_bpe_run_exports_its_tokenizer_with_end_of_text(tmp_path: Path,
                                                          bpe_corpus: CorpusInfo) -> None:
    arch = arch_of(spec_from_arch({**TINY_GPT, "vocab_size": bpe_corpus.vocab_size}))
    rd = new_run(tmp_path / "run", bpe_corpus)
    write_versions(rd, arch)
    out = tmp_path / "out"
    export_model(rd, out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == bpe_corpus.eot_id
    gen_cfg = json.loads((out / "generation_config.json").read_text())
    assert gen_cfg["eos_token_id"] == bpe_corpus.eot_id and gen_cfg["do_sample"] is False
    assert gen_cfg["max_new_tokens"] == 16  # min(128, block_size // 2)
    ids = tok("the dog ran", return_tensors="pt")
    assert tok.decode(ids["input_ids"][0]) == "the dog ran"  # no token added
    gen = AutoModelForCausalLM.from_pretrained(out).generate(**ids)
    assert isinstance(tok.decode(gen[0, ids["input_ids"].shape[1]:]), str)
    card = ModelCard.load(out / "README.md")
    assert card.data.to_dict()["license"] == "cc-by-4.0"


def test_a_tokenizer_wider_than_the_model_is_refused(tmp_path: Path,
                                                      bpe_corpus: CorpusInfo) -> None:
    rd = new_run(tmp_path / "run", bpe_corpus)
    write_versions(rd, arch_of(spec_from_arch(TINY_GPT)), n=1)  # 256 < 300 ids
    result = run_cli(rd.path, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "tokenizer has 300 ids" in result.stderr
    assert not (tmp_path / "out").exists()


# -- the card ------------------------------------------------------------------------------


def ledger_numbers(rd: RunDir) -> dict[str, Any]:
    """What the card must say, computed here straight from the ledger's rows."""
    with Ledger.read_only(f"sqlite:///{rd.path / 'ledger.db'}") as ledger:
        inst_name = {i.id: i.name for i in ledger.institutions()}
        inst_of = {n.id: inst_name[n.institution_id] for n in ledger.nodes()}
        per: dict[str, dict[str, Any]] = defaultdict(
            lambda: {"tokens_trained": 0, "tokens_evaluated": 0, "credits": 0.0,
                     "accepted_updates": 0})
        for update, lease in ledger.updates_with_leases():
            if update.verdict == "accepted":
                row = per[inst_of[update.node_id]]
                row["accepted_updates"] += 1
                row["tokens_trained" if lease.kind == "train" else "tokens_evaluated"] += \
                    update.tokens
        for credit in ledger.credits():
            per[inst_of[credit.node_id]]["credits"] += credit.amount
        bodies = [RECEIPT_PREFIX + r.body.encode() for r in ledger.receipts()]
        versions = [(v.version, v.n_updates, v.tokens, v.val_loss, v.digest)
                    for v in ledger.versions()]
    tree = MerkleTree([leaf_hash(b) for b in bodies])
    return {"institutions": dict(per), "root": tree.root.hex(), "size": len(bodies),
            "versions": versions}


def test_the_cards_numbers_are_the_ledgers(trained: RunDir, tmp_path: Path) -> None:
    out = tmp_path / "model"
    result = run_cli(trained.path, "--out", out)
    assert result.exit_code == 0, result.output
    want = ledger_numbers(trained)
    assert want["size"] > 0 and len(want["institutions"]) == 2
    prov = json.loads((out / "atom_provenance.json").read_bytes())
    raw = (out / "atom_provenance.json").read_bytes()
    assert raw == json.dumps(prov, sort_keys=True, separators=(",", ":")).encode()  # canonical
    # contributions: every institution's verified tokens and credits, most tokens first
    got = {c["institution"]: c for c in prov["contributions"]}
    assert set(got) == set(want["institutions"])
    for name, w in want["institutions"].items():
        for key in ("tokens_trained", "tokens_evaluated", "accepted_updates"):
            assert got[name][key] == w[key], (name, key)
        assert got[name]["credits"] == pytest.approx(w["credits"], abs=1e-6)
    trained_tokens = [c["tokens_trained"] for c in prov["contributions"]]
    assert trained_tokens == sorted(trained_tokens, reverse=True)
    # versions, the exported one last, with its digest
    assert [(v["version"], v["updates"], v["tokens"], v["val_loss"], v["digest"])
            for v in prov["versions"]] == [tuple(v) for v in want["versions"]]
    latest = want["versions"][-1]
    assert (prov["version"], prov["model_digest"]) == (latest[0], latest[4])
    assert prov["receipts"] == {"root": want["root"], "tree_size": want["size"]}
    # the manifest
    manifest = json.loads((trained.corpus / "manifest.json").read_text())
    assert [{k: s[k] for k in ("name", "licence", "digest", "documents", "tokens")}
            for s in manifest["sources"]] == prov["sources"]
    assert prov["licence"] == "CC0-1.0" and prov["licence_from"] == "data manifest"
    # the YAML front matter says the same
    card = ModelCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert meta["license"] == "cc0-1.0" and meta["library_name"] == "transformers"
    assert "atom-network" in meta["tags"] and meta["datasets"] == [manifest["sources"][0]["name"]]
    [index] = meta["model-index"]
    [result_] = index["results"]
    [metric] = result_["metrics"]
    assert metric["type"] == "loss" and metric["value"] == latest[3] is not None
    assert "validation loss" in metric["name"]
    atom = meta["atom_network"]
    assert (atom["receipts_root"], atom["receipts_tree_size"]) == (want["root"], want["size"])
    assert (atom["version"], atom["model_digest"], atom["licence"]) == (
        latest[0], latest[4], "CC0-1.0")
    # and the body: contributors in order, the history, the root and how to check it
    body = card.text
    rows = [line for line in body.splitlines() if line.startswith("| Uni ")]
    assert [r.split("|")[1].strip() for r in rows] == [c["institution"]
                                                       for c in prov["contributions"]]
    for c in prov["contributions"]:
        assert f"| {c['tokens_trained']:,} |" in body
    assert f"atom-node credits --proof --root {want['root']}" in body
    assert latest[4] in body and f"| {latest[0]} | {latest[1]} |" in body
    assert manifest["sources"][0]["digest"] in body


def test_an_older_version_carries_the_history_up_to_it(tmp_path: Path,
                                                       byte_corpus: CorpusInfo) -> None:
    rd = new_run(tmp_path / "run", byte_corpus)
    versions = write_versions(rd, TINY_GPT, n=3)
    out = tmp_path / "out"
    export_model(rd, out, version=1)
    prov = json.loads((out / "atom_provenance.json").read_text())
    assert [v["version"] for v in prov["versions"]] == [0, 1]
    assert prov["model_digest"] == versions[1]["digest"] and prov["contributions"] == []
    assert prov["receipts"]["tree_size"] == 0
    meta = ModelCard.load(out / "README.md").data.to_dict()
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 4.0


# -- bad input -----------------------------------------------------------------------------


def run_cli(*args: object):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(coordinator_app, ["export-model", *map(str, args)],
                              catch_exceptions=False)


def one_line_error(result, code: int, text: str) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], lines


SmallRun = tuple[RunDir, list[dict]]


@pytest.fixture
def small_run(tmp_path: Path, byte_corpus: CorpusInfo) -> SmallRun:
    rd = new_run(tmp_path / "run", byte_corpus)
    return rd, write_versions(rd, TINY_GPT)


def test_not_a_run_directory(tmp_path: Path) -> None:
    one_line_error(run_cli(tmp_path, "--out", tmp_path / "out"), 2, "is not a run directory")


def test_a_version_the_ledger_does_not_have(small_run: SmallRun, tmp_path: Path) -> None:
    rd, _ = small_run
    one_line_error(run_cli(rd.path, "--out", tmp_path / "out", "--version", 7), 6,
                   "version 7 is not in the ledger")
    assert not (tmp_path / "out").exists()


def test_a_run_with_no_version_yet(tmp_path: Path, byte_corpus: CorpusInfo) -> None:
    rd = new_run(tmp_path / "run", byte_corpus)
    one_line_error(run_cli(rd.path, "--out", tmp_path / "out"), 6, "no model version yet")


def test_a_missing_checkpoint(small_run: SmallRun, tmp_path: Path) -> None:
    rd, versions = small_run
    versions[0]["path"].unlink()
    one_line_error(run_cli(rd.path, "--out", tmp_path / "out", "--version", 0), 6,
                   "missing file")


def test_a_corrupt_checkpoint(small_run: SmallRun, tmp_path: Path) -> None:
    rd, versions = small_run
    path = versions[1]["path"]
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0xFF  # a weight byte: the header still parses, the digest no longer matches
    path.write_bytes(bytes(blob))
    one_line_error(run_cli(rd.path, "--out", tmp_path / "out"), 6, "digest mismatch")
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_that_is_not_the_recorded_version(small_run: SmallRun, tmp_path: Path) -> None:
    rd, versions = small_run
    for suffix in (".safetensors", ".json"):  # version 0's files where version 1's should be
        shutil.copy(versions[0]["path"].with_suffix(suffix),
                    versions[1]["path"].with_suffix(suffix))
    one_line_error(run_cli(rd.path, "--out", tmp_path / "out"), 6, "the ledger recorded")


def test_out_not_empty_is_refused_unless_forced(small_run: SmallRun, tmp_path: Path) -> None:
    rd, versions = small_run
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    one_line_error(run_cli(rd.path, "--out", out), 1, "exists and is not empty")
    assert (out / "keep.txt").read_text() == "mine"
    result = run_cli(rd.path, "--out", out, "--force")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert "version 1" in result.stderr
    (tmp_path / "file").write_text("x")
    one_line_error(run_cli(rd.path, "--out", tmp_path / "file", "--force"), 1,
                   "is not a directory")


def test_an_empty_out_directory_is_used(small_run: SmallRun, tmp_path: Path) -> None:
    rd, _ = small_run
    (tmp_path / "out").mkdir()
    result = run_cli(rd.path, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert not [p for p in tmp_path.iterdir() if ".export-" in p.name]  # no staging left
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()} == {0o666 & ~umask}
