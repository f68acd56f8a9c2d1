"""Memory handed back between cycles (`daemon.engine.release_free_memory`)."""

from __future__ import annotations

import ctypes.util
import sys

import pytest

from daemon.engine import release_free_memory


def rss_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None,
                    reason="glibc's malloc_trim: Linux only")
def test_free_heap_pages_in_the_middle_of_the_heap_go_back_to_the_os() -> None:
    # 60 MB of 64 KB blocks (under glibc's mmap threshold: they come from the heap), every other
    # one freed: the holes stay resident until trimmed, since the heap's top is still in use.
    blocks = [bytearray(b"x" * 65536) for _ in range(960)]
    del blocks[::2]
    before = rss_kb()
    assert release_free_memory()
    after = rss_kb()
    assert before - after > 20_000, (before, after)     # most of the ~30 MB of holes
    assert sum(len(b) for b in blocks) == 480 * 65536    # the live half is untouched


PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1


def _deny_write_execute() -> None:       # in the child, before it execs Python
    import ctypes

    ctypes.CDLL(None).prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0)


def test_trimming_works_under_the_units_memory_deny_write_execute() -> None:
    """systemd/provisiond.service sets MemoryDenyWriteExecute=yes; the kernel's own form of it
    (prctl PR_SET_MDWE, Linux 6.3+) is set before the interpreter starts, so importing ctypes
    and trimming run under it, as in the unit."""
    import ctypes
    import subprocess

    if not sys.platform.startswith("linux") or ctypes.CDLL(None).prctl(PR_GET_MDWE, 0, 0, 0, 0) < 0:
        pytest.skip("no PR_SET_MDWE on this kernel")
    code = ("import ctypes, daemon.engine as e; "
            f"print(ctypes.CDLL(None).prctl({PR_GET_MDWE}, 0, 0, 0, 0), e.release_free_memory() in (True, False))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         preexec_fn=_deny_write_execute, check=True)
    assert out.stdout.split() == [str(PR_MDWE_REFUSE_EXEC_GAIN), "True"], out.stderr
