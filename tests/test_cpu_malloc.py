"""The engine's malloc setting on CPU (`training.setup.cpu_malloc`): in a LoRA or QLoRA run every allocation from
1 MB up gets its own mapping, where glibc's default threshold has grown past it and serves it from the heap; a
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
    import ctypes, ctypes.util, json, sys
    sys.path.insert(0, sys.argv[1])
    import torch
    from training.setup import cpu_malloc

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                          "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc.mallinfo2.restype = MallInfo2

    libc.free(libc.malloc(16 << 20))  # a freed mapped block raises glibc's dynamic threshold to 16 MB
    chosen = cpu_malloc(torch.device(sys.argv[2]), sys.argv[3])
    before = libc.mallinfo2().hblks
    block = libc.malloc(2 << 20)
    mapped = libc.mallinfo2().hblks - before
    libc.free(block)
    print(json.dumps({"chosen": chosen, "mapped": mapped}))
""")


def probe(device: str, method: str = "lora", **env: str) -> dict:
    import os

    done = subprocess.run([sys.executable, "-c", PROBE, str(ROOT), device, method], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "MODELCREW_MMAP"))} | env)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/maps").exists() or "glibc" not in " ".join(__import__("platform").libc_ver()),
                    reason="mallopt and mallinfo2 are glibc's")
def test_a_cpu_lora_run_maps_every_allocation_from_1_mb_up_and_leaves_a_users_setting_alone():
    assert probe("cpu") == {"chosen": 1 << 20, "mapped": 1}  # its own mapping, unmapped when freed
    assert probe("cpu", "qlora") == {"chosen": 1 << 20, "mapped": 1}
    assert probe("cpu", "full") == {"chosen": None, "mapped": 0}  # glibc's default: from the heap
    assert probe("cpu", "full", MODELCREW_MMAP_THRESHOLD="1048576") == {"chosen": 1 << 20, "mapped": 1}  # asked for
    assert probe("cpu", MODELCREW_MMAP_THRESHOLD="0") == {"chosen": None, "mapped": 0}  # glibc's: from the heap
    assert probe("cpu", MALLOC_MMAP_THRESHOLD_="33554432") == {"chosen": None, "mapped": 0}  # the user's own, kept
    assert probe("cpu", MODELCREW_MMAP_THRESHOLD="4194304") == {"chosen": 4 << 20, "mapped": 0}  # 2 MB is under it
    assert probe("meta") == {"chosen": None, "mapped": 0}  # not a CPU run: untouched
