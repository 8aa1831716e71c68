"""`--release-memory`: glibc gives freed tensor memory back instead of keeping it fragmented."""

import subprocess
import sys

import pytest

PROBE = r"""
import sys
import torch
from rlhflab import memory

def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

if sys.argv[1] == "release":
    assert memory.release_freed_memory()
block = torch.ones(4 << 20, dtype=torch.uint8)
del block                                      # a freed large block: glibc raises its mmap threshold
kept, freed = [], []
for _ in range(200):                           # 1 MiB blocks interleaved with small ones that stay
    freed.append(torch.ones(1 << 18))
    kept.append(torch.ones(1 << 12))
before = rss_mib()
freed.clear()
print(round(before - rss_mib(), 1))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_release_freed_memory_returns_freed_blocks():
    def released(mode: str) -> float:
        env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, check=True)
        return float(out.stdout.strip().splitlines()[-1])

    # 200 MiB freed: with the option nearly all of it leaves the process; glibc's default keeps it
    assert released("release") > 150
    assert released("default") < 50


def test_release_memory_is_a_training_option(tmp_path):
    from rlhflab.config import SFTConfig, TrainOptions

    assert "release_memory" in TrainOptions.__dataclass_fields__
    assert SFTConfig().release_memory is False


# The default: glibc's small-block caches off, so that freed activations are reused (memory.py).
REUSE_PROBE = r"""
import sys
from rlhflab import memory

if sys.argv[1] == "restart":
    memory.restart_for_memory_reuse()            # what `rlhflab <command>` does first
import torch

def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

block = torch.empty(8 << 20)
del block                                      # raises glibc's mmap threshold: what follows comes from the heap
start, small = rss_mib(), []
for _ in range(4):                             # four "forward passes" of 24 layers, each freed as by a backward
    saved = []
    for _ in range(24):
        for size in (1 << 16, 1 << 16, 5 << 15, 5 << 15):   # 256 KiB and 640 KiB activations
            saved.append(torch.ones(size))
            torch.ones(size)                   # a transient, freed at once
            small.append(torch.ones(2))        # small objects that outlive the pass
    live = sum(t.numel() * 4 for t in saved) / 2**20
    grown = rss_mib() - start
    saved.clear()
print(round(grown / live, 2))
"""


def _resident_over_live(tmp_path, mode: str, tunables: str | None = None) -> float:
    probe = tmp_path / "probe.py"
    probe.write_text(REUSE_PROBE)
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", **({"GLIBC_TUNABLES": tunables} if tunables else {})}
    out = subprocess.run([sys.executable, str(probe), mode], capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_restart_for_memory_reuse_keeps_resident_memory_near_live(tmp_path):
    # Same-shaped activations, freed and allocated again: reused with the restart, the heap grows without
    assert _resident_over_live(tmp_path, "restart") < 1.6
    assert _resident_over_live(tmp_path, "none") > 2.5
    # glibc's own setting, given by the user, wins (and is how the default is turned off)
    assert _resident_over_live(tmp_path, "restart", "glibc.malloc.tcache_count=7") > 2.5


def test_memory_reuse_environment_adds_to_the_users_tunables_and_never_overrides_them(monkeypatch):
    from rlhflab import memory

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(memory.os, "confstr", lambda name: "glibc 2.36")
    env = memory.memory_reuse_environment({"HOME": "/h", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.tcache_count=0:glibc.malloc.mxfast=0"
    assert env["HOME"] == "/h"
    assert memory.memory_reuse_environment({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"}) is None
    assert memory.memory_reuse_environment({"GLIBC_TUNABLES": env["GLIBC_TUNABLES"]}) is None   # no restart loop
    monkeypatch.setattr(memory.os, "confstr", lambda name: "musl")
    assert memory.memory_reuse_environment({}) is None
    monkeypatch.setattr(sys, "platform", "darwin")
    assert memory.memory_reuse_environment({}) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_rlhflab_ppo_restarts_with_the_settings_and_python_calls_do_not():
    code = ("import os, sys; print('tunables:', os.environ.get('GLIBC_TUNABLES')); "
            "from rlhflab.cli.main import main; sys.argv = ['rlhflab', *sys.argv[1:]]; main({})")
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}

    def tunables_seen(call: str, command: str) -> list[str]:
        out = subprocess.run([sys.executable, "-c", code.format(call), command, "--help"], capture_output=True,
                             text=True, env=env)
        assert "--help" in out.stdout or "usage" in out.stdout.lower(), out.stderr[-500:]
        return [line.split(": ", 1)[1] for line in out.stdout.splitlines() if line.startswith("tunables:")]

    # `rlhflab ppo` on the command line: once without, then again in the restarted process with them
    assert tunables_seen("None", "ppo") == ["None", "glibc.malloc.tcache_count=0:glibc.malloc.mxfast=0"]
    # main(argv) from Python code never restarts the caller's process; other commands do not restart
    assert tunables_seen("['ppo', '--help']", "ppo") == ["None"]
    assert tunables_seen("None", "judge") == ["None"]
