"""The contribution policy (``node.policy``): time windows on a fake clock, malformed files as
one ``ConfigError`` line, the GPU-busy pause on a fake NVML (``node.gpu``), and ``join``'s
flags and checks."""

from __future__ import annotations

import dataclasses
import json
import sys
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
from typer.testing import CliRunner

from node import gpu
from node.cli import app as node_app
from node.client_app import lease_gate
from node.gpu import NvmlProbe, check_memory, cuda_index
from node.limits import arch_params
from node.pause import LeaseGate, Paused
from node.policy import Policy, Window, parse_size
from protocol.errors import ConfigError, ProtocolError

NIGHTS_AND_WEEKENDS = 'windows = ["Mon-Fri 19:00-07:00", "Sat-Sun 00:00-24:00"]\n'
MONDAY = datetime(2024, 6, 3)  # a Monday


def at(day: int, hhmm: str) -> datetime:
    """``day`` days after Monday 2024-06-03, at HH:MM local (naive) time."""
    h, m = map(int, hhmm.split(":"))
    return MONDAY + timedelta(days=day, hours=h, minutes=m)


# -- time windows ---------------------------------------------------------------------------

@pytest.mark.parametrize("when, ok", [
    (at(0, "12:00"), False),  # Monday noon: the owner's
    (at(0, "18:59"), False),
    (at(0, "19:00"), True),   # Monday night opens
    (at(1, "06:59"), True),   # ... and runs past midnight into Tuesday
    (at(1, "07:00"), False),
    (at(4, "23:30"), True),   # Friday night
    (at(5, "06:00"), True),   # Saturday early: Friday's night and Saturday's day both
    (at(5, "15:00"), True),   # Saturday
    (at(6, "23:59"), True),   # Sunday's last minute
    (at(7, "03:00"), False),  # Monday 03:00: Sunday's window ended at 24:00, and no window
                              # opens on Sunday night, so the week starts with the owner's
])
def test_nights_and_weekends(when: datetime, ok: bool) -> None:
    policy = Policy.from_toml(NIGHTS_AND_WEEKENDS)
    decision = policy.allows(when)
    assert decision.ok is ok, (when.strftime("%a %H:%M"), decision)
    assert (decision.why == "") is ok


def test_outside_a_window_says_when_it_opens() -> None:
    policy = Policy.from_toml(NIGHTS_AND_WEEKENDS)
    ok, why, retry = policy.allows(at(0, "12:00"))  # Monday noon: opens at 19:00
    assert not ok and retry == 7 * 3600
    assert why == "outside this node's time windows (next opens Mon 19:00)"
    ok, _, retry = policy.allows(at(7, "06:30"))  # Monday 06:30 next week: 12.5 h
    assert not ok and retry == 12.5 * 3600


def test_the_clock_is_injected_and_a_window_wraps_the_week() -> None:
    now = [at(6, "22:00")]  # Sunday 22:00
    policy = dataclasses.replace(Policy.from_toml('windows = ["Sun-Mon 23:00-01:00"]'),
                                 clock=lambda: now[0])
    why = "outside this node's time windows (next opens Sun 23:00)"
    assert policy.allows() == (False, why, 3600.0)
    now[0] = at(7, "00:30")  # Monday 00:30: Sunday's window, past midnight into the week
    assert policy.allows().ok
    now[0] = at(7, "23:30")  # Monday 23:30: Monday's own
    assert policy.allows().ok
    now[0] = at(8, "00:59")  # ... into Tuesday
    assert policy.allows().ok
    now[0] = at(8, "01:00")
    assert not policy.allows().ok


def test_no_windows_means_any_time_and_daily_windows() -> None:
    assert Policy().allows(at(2, "13:37")).ok
    nightly = Window.parse("22:00-06:00")  # no days: every day
    assert nightly.days == frozenset(range(7))
    assert nightly.contains(at(2, "23:00")) and nightly.contains(at(3, "05:59"))
    assert not nightly.contains(at(3, "06:00"))
    assert Window.parse("Mon,Wed,Fri 08:00-12:00").days == {0, 2, 4}
    assert Window.parse("fri-mon 00:00-24:00").days == {4, 5, 6, 0}
    assert Window.parse("Saturday 00:00-24:00").length == 24 * 60


@pytest.mark.parametrize("text, match", [
    ('windows = ["Mon-Fri 19:00-25:00"]', "'25:00' is not a time HH:MM"),
    ('windows = ["Mon-Fri 19:60-07:00"]', "'19:60' is not a time"),
    ('windows = ["Mo-Fr 19:00-07:00"]', "'Mo' is not a day"),
    ('windows = ["Funday 19:00-07:00"]', "'Funday' is not a day"),
    ('windows = ["Mon-Fri 19:00"]', "expected a time range HH:MM-HH:MM"),
    ('windows = ["Mon-Fri 19:00-19:00"]', "opens and closes at the same time"),
    ('windows = ["Mon - Fri 19:00-07:00"]', 'expected "\\[DAYS\\] HH:MM-HH:MM"'),
    ('windows = "Mon-Fri 19:00-07:00"', "windows must be a list"),
    ('windows = [7]', "expected a string"),
    ("pause_when_gpu_busy = 1", "pause_when_gpu_busy must be true or false"),
    ("gpu_busy_percent = 150", "gpu_busy_percent must be an integer 0 to 100"),
    ("busy_retry_s = 1", "busy_retry_s must be seconds from 10"),
    ('max_gpu_memory = "lots"', "max_gpu_memory: 'lots' is not a size"),
    ('max_gpu_memory = "0GiB"', "max_gpu_memory: must be at least one byte"),
    ("window = []", "unknown key 'window'"),
    ("windows = [", "not valid TOML"),
])
def test_a_malformed_policy_is_one_config_error_line(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        Policy.from_toml(text, "policy.toml")
    assert "\n" not in str(err.value) and str(err.value).startswith("policy.toml")


def test_sizes() -> None:
    assert parse_size("40GiB", "x") == 40 * 2**30
    assert parse_size("1.5 GB", "x") == 1_500_000_000
    assert parse_size("512mib", "x") == 512 * 2**20
    assert parse_size(4096, "x") == 4096
    with pytest.raises(ConfigError, match="is not a size"):
        parse_size(True, "x")


def test_flags_go_on_top_of_the_file_and_the_policy_round_trips() -> None:
    text = NIGHTS_AND_WEEKENDS + 'max_gpu_memory = "10GiB"\nbusy_retry_s = 60\n'
    policy = Policy.from_toml(text).with_flags(["Sat-Sun 00:00-24:00"], True, "40GiB")
    assert [w.text for w in policy.windows] == ["Sat-Sun 00:00-24:00"]
    assert policy.pause_when_gpu_busy and policy.max_gpu_memory == 40 * 2**30
    assert policy.busy_retry_s == 60.0
    assert Policy.from_dict(json.loads(json.dumps(policy.to_dict()))) == policy
    assert Policy.from_toml(text).with_flags() == Policy.from_toml(text)
    with pytest.raises(ConfigError, match="--max-gpu-memory"):
        Policy().with_flags(max_gpu_memory="forty")


# -- the GPU: a fake NVML --------------------------------------------------------------------

class FakeNvmlError(Exception):
    pass


class FakeNvml:
    """The calls ``NvmlProbe`` makes, over a scripted device table."""

    NVMLError = FakeNvmlError

    def __init__(self, procs: list[tuple[int, int | None]] = (), util: int = 0,
                 graphics: list[tuple[int, int | None]] = ()) -> None:
        self.procs, self.graphics, self.util = list(procs), list(graphics), util
        self.asked: list[object] = []
        self.fail = False

    def nvmlDeviceGetHandleByIndex(self, i: int) -> str:
        self.asked.append(i)
        if i > 3:
            raise FakeNvmlError("Invalid Argument")
        return f"gpu{i}"

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        self.asked.append(uuid)
        return uuid

    def _check(self) -> None:
        if self.fail:
            raise FakeNvmlError("GPU is lost")

    def nvmlDeviceGetComputeRunningProcesses(self, h: str) -> list[NS]:
        self._check()
        return [NS(pid=p, usedGpuMemory=m) for p, m in self.procs]

    def nvmlDeviceGetGraphicsRunningProcesses(self, h: str) -> list[NS]:
        self._check()
        return [NS(pid=p, usedGpuMemory=m) for p, m in self.graphics]

    def nvmlDeviceGetUtilizationRates(self, h: str) -> NS:
        self._check()
        return NS(gpu=self.util, memory=0)


OURS = 4242


def probe(nvml: FakeNvml, **kw: object) -> NvmlProbe:
    return NvmlProbe(nvml, 0, own_pids={OURS}, visible="", **kw)  # type: ignore[arg-type]


def test_another_process_on_the_gpu_makes_it_busy() -> None:
    nvml = FakeNvml(procs=[(OURS, 30 << 30), (777, 12 << 30)])
    assert probe(nvml)(False) == "the GPU is in use by another process (pid 777; 12,288 MiB)"
    assert probe(nvml)(True) is not None  # while we work too: the owner's job came back
    shown = FakeNvml(graphics=[(778, None)])  # a desktop on the GPU, memory not reported
    assert "pid 778" in probe(shown)(False)


def test_only_our_own_process_is_not_busy() -> None:
    assert probe(FakeNvml(procs=[(OURS, 30 << 30)]))(False) is None
    assert probe(FakeNvml())(False) is None


def test_utilization_counts_only_while_we_are_idle() -> None:
    nvml = FakeNvml(procs=[(OURS, 1 << 30)], util=90)
    assert probe(nvml)(False) is None  # no threshold set: processes only
    assert probe(nvml, busy_percent=50)(False) == \
        "the GPU is 90% busy (this node pauses above 50%)"
    assert probe(nvml, busy_percent=50)(True) is None  # our own lease makes that 90%


def test_nvml_failing_mid_run_pauses_rather_than_crowd_the_owner() -> None:
    nvml = FakeNvml()
    p = probe(nvml)
    nvml.fail = True
    assert p(False) == "cannot read the GPU's use from NVML (GPU is lost)"


def test_the_device_is_found_through_cuda_visible_devices() -> None:
    nvml = FakeNvml()
    NvmlProbe(nvml, 1, visible="3,2")  # a SLURM job given GPUs 3 and 2: cuda:1 is NVML's 2
    NvmlProbe(nvml, 0, visible="GPU-8a1b")
    NvmlProbe(nvml, 2, visible="")
    assert nvml.asked == [2, "GPU-8a1b", 2]
    with pytest.raises(ConfigError, match="NVML has no GPU 9"):
        NvmlProbe(nvml, 0, visible="9")
    assert cuda_index("auto") == 0 and cuda_index("cuda:3") == 3
    with pytest.raises(ConfigError, match="needs a CUDA device, not --device cpu"):
        cuda_index("cpu")


def test_a_busy_gpu_hands_back_with_the_policy_retry() -> None:
    nvml = FakeNvml(procs=[(777, 1 << 30)])
    policy = dataclasses.replace(Policy.from_toml("pause_when_gpu_busy = true\n"
                                                  "busy_retry_s = 120"), probe=probe(nvml))
    with pytest.raises(Paused) as paused:
        LeaseGate(policy).check(working=False)
    assert paused.value.retry_after_s == 120.0 and "pid 777" in paused.value.reason
    nvml.procs = [(OURS, 1 << 30)]  # the owner's job is done
    LeaseGate(policy).check(working=False)


def test_the_gate_asks_nvml_at_most_every_few_seconds_mid_lease() -> None:
    asked: list[bool] = []
    t = [0.0]
    policy = Policy(pause_when_gpu_busy=True, probe=lambda working: asked.append(working))
    gate = LeaseGate(policy, monotonic=lambda: t[0], recheck_s=5.0)
    gate.check(working=False)
    for t[0] in (1.0, 2.0, 4.9):
        gate.check(working=True)
    t[0] = 5.5
    gate.check(working=True)
    assert asked == [False, True]


def test_without_nvml_the_flag_is_a_clear_config_error(monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # as if nvidia-ml-py were not installed
    with pytest.raises(ConfigError, match="pip install nvidia-ml-py"):
        gpu.load_nvml()
    result = CliRunner().invoke(node_app, ["join", "--pause-when-gpu-busy", "--token", "x"])
    assert result.exit_code == 2
    assert result.output.strip() == ("error: pause_when_gpu_busy needs NVML: pip install "
                                     "nvidia-ml-py")


def test_the_memory_floor_refuses_work_that_cannot_fit() -> None:
    params = arch_params({"vocab_size": 256, "block_size": 128, "n_layer": 4,
                          "n_embd": 128})  # ~0.8M
    check_memory("train", params, 1 << 30)
    with pytest.raises(ProtocolError, match="work refused: the model needs at least"):
        check_memory("train", params, 4 << 20)  # 16 bytes/param > 4 MiB
    check_memory("eval", params, 4 << 20)  # the weights alone fit


# -- join: the policy is checked first, and handed to the worker ------------------------------

def test_join_with_a_malformed_policy_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "policy.toml"
    bad.write_text('windows = ["Mon-Fri 19:00-07:00", "weekends"]\n')
    result = CliRunner().invoke(node_app, ["join", "--policy", str(bad), "--token", "x",
                                           "--home", str(tmp_path / "home")])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (f"error: {bad}: window 'weekends': expected a time "
                                     "range HH:MM-HH:MM")
    assert not (tmp_path / "home").exists()  # checked before the token was touched
    missing = CliRunner().invoke(node_app, ["join", "--policy", str(tmp_path / "none.toml")])
    assert missing.exit_code == 2 and "No such file" in missing.output
    flag = CliRunner().invoke(node_app, ["join", "--window", "Mon-Fri 7pm-7am"])
    assert flag.exit_code == 2
    assert flag.output.strip() == "error: --window 'Mon-Fri 7pm-7am': '7pm' is not a time " \
                                  "HH:MM (00:00 to 24:00)"


def test_the_worker_reads_the_policy_join_wrote(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "policy.json"
    rules = Policy.from_toml(NIGHTS_AND_WEEKENDS + "pause_when_gpu_busy = true\n"
                             "gpu_busy_percent = 40")
    path.write_text(json.dumps(rules.to_dict()))
    nvml = FakeNvml()
    monkeypatch.setattr("node.client_app.load_nvml", lambda: nvml)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gate = lease_gate({"policy": str(path), "device": "cuda:1"})
    assert gate.policy == rules
    assert isinstance(gate.policy.probe, NvmlProbe) and gate.policy.probe.busy_percent == 40
    assert nvml.asked == [1]  # the worker's own device
    assert lease_gate({}).policy == Policy()
    path.write_text("{")
    with pytest.raises(ConfigError, match="cannot be read"):
        lease_gate({"policy": str(path)})
