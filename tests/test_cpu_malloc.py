"""The engine's malloc setting on CPU (`training.setup.cpu_malloc`): in a LoRA or QLoRA run every allocation from
2 MB up gets its own mapping, where glibc's default threshold has grown past it and serves it from the heap; a
full-weight run keeps glibc's default. Checked with glibc's own
count of mapped blocks (mallinfo2's hblks), in a fresh process each, as the setting lasts for the process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROBE = textwrap.dedent("""
    import ctypes, ctypes.util, json, os, sys
    sys.path.insert(0, sys.argv[1])
    import torch
    from training.setup import cpu_malloc

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                          "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc.mallinfo2.restype = MallInfo2

    def case(device, method, env):  # in a forked child: the setting lasts for the process
        os.environ.update(env)
        libc.free(libc.malloc(16 << 20))  # a freed mapped block raises glibc's dynamic threshold to 16 MB
        chosen = cpu_malloc(torch.device(device), method)
        before = libc.mallinfo2().hblks
        block = libc.malloc(2 << 20)
        mapped = libc.mallinfo2().hblks - before
        libc.free(block)
        return {"chosen": chosen, "mapped": mapped}

    out = []
    for device, method, env in json.loads(sys.argv[2]):  # one torch import, a fresh process (fork) per case
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(write, json.dumps(case(device, method, env)).encode())
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as f:
            out.append(json.loads(f.read()))
        assert os.waitpid(pid, 0)[1] == 0
    print(json.dumps(out))
""")


def probe(*cases: tuple[str, str, dict], **start_env: str) -> list[dict]:
    """Each case (device, method, environment) in its own forked process of one interpreter started with
    `start_env` (glibc reads MALLOC_* variables when a process starts)."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "MODELCREW_MMAP"))} | start_env
    done = subprocess.run([sys.executable, "-c", PROBE, str(ROOT), json.dumps(cases)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/maps").exists() or "glibc" not in " ".join(__import__("platform").libc_ver()),
                    reason="mallopt and mallinfo2 are glibc's")
def test_a_cpu_lora_run_maps_every_allocation_from_2_mb_up_and_leaves_a_users_setting_alone():
    assert probe(("cpu", "lora", {}),  # its own mapping, unmapped when freed
                 ("cpu", "qlora", {}),
                 ("cpu", "full", {}),  # glibc's default: from the heap
                 ("cpu", "full", {"MODELCREW_MMAP_THRESHOLD": "1048576"}),  # asked for
                 ("cpu", "lora", {"MODELCREW_MMAP_THRESHOLD": "0"}),  # glibc's: from the heap
                 ("cpu", "lora", {"MODELCREW_MMAP_THRESHOLD": "4194304"}),  # 2 MB is under it
                 ("meta", "lora", {})) == [  # not a CPU run: untouched
        {"chosen": 2 << 20, "mapped": 1}, {"chosen": 2 << 20, "mapped": 1}, {"chosen": None, "mapped": 0},
        {"chosen": 1 << 20, "mapped": 1}, {"chosen": None, "mapped": 0}, {"chosen": 4 << 20, "mapped": 0},
        {"chosen": None, "mapped": 0}]
    # the user's own setting, read by glibc when the process starts, is kept
    assert probe(("cpu", "lora", {}), MALLOC_MMAP_THRESHOLD_="33554432") == [{"chosen": None, "mapped": 0}]
