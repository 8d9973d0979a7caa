"""One rank's failure ends every rank within 60 seconds, for real: 2 CPU processes (gloo, FSDP2) where rank 1 raises
mid-step, is SIGKILLed mid-step, or cannot write its shard of a distributed checkpoint, or rank 0 (which started
rank 1 and hosts the process group's store) is SIGKILLed mid-step. Every process ends, the
exit is non-zero, the output names the failed rank and the cause, and the previous checkpoint still loads."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_resume import corpus, fit_command  # noqa: F401  (corpus is a fixture)

pytestmark = pytest.mark.multiprocess

FAULT_STEP = 3


def _session_alive(sid: int) -> list[str]:
    found = subprocess.run(["pgrep", "-s", str(sid)], capture_output=True, text=True)
    return found.stdout.split()


# the default suite has the exception; the other faults (35 s each) run in `make test-all`
@pytest.mark.parametrize(("kind", "rank"), [("raise", 1), pytest.param("sigkill", 1, marks=pytest.mark.slow),
                                            pytest.param("write", 1, marks=pytest.mark.slow),
                                            pytest.param("sigkill", 0, marks=pytest.mark.slow)])
def test_a_failing_rank_ends_every_rank_with_its_rank_and_cause(corpus, tmp_path, kind, rank):  # noqa: F811
    root, marker = tmp_path / "run", tmp_path / "fault_time"
    cmd = fit_command(corpus, root, "--trainer.callbacks+=tests.faults.Fault", f"--trainer.callbacks.kind={kind}",
                      f"--trainer.callbacks.rank={rank}", f"--trainer.callbacks.step={FAULT_STEP}",
                      f"--trainer.callbacks.marker={marker}", devices=2, workers=0)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=400)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
    deadline = time.time() + 90
    while _session_alive(proc.pid) and time.time() < deadline:  # the other rank (rank 0's child) as well
        time.sleep(0.1)
    ended = time.time()
    text = log.read_text()
    assert marker.exists(), f"the fault never happened:\n{text[-3000:]}"
    took = ended - float(marker.read_text())
    assert not _session_alive(proc.pid), f"processes left behind: {_session_alive(proc.pid)}\n{text[-3000:]}"
    assert rc != 0, text[-3000:]
    assert took < 60, f"the run took {took:.0f} s to end after the fault"

    lines = [ln for ln in text.splitlines() if ln.startswith("unigendet fit: rank ")]
    if kind == "raise":
        assert "unigendet fit: rank 1 failed: ValueError: injected fault on rank 1 at step 3" in lines, text[-3000:]
    elif kind == "sigkill" and rank == 1:
        assert any(ln.startswith("unigendet fit: rank 0 stopped: rank 1 (pid ") and "killed by a signal" in ln
                   for ln in lines), text[-3000:]
    elif kind == "sigkill":  # rank 0 hosts the process group's store: its silence names it
        assert any(ln.startswith("unigendet fit: rank 1 stopped: rank 0 is gone") and "killed by a signal" in ln
                   for ln in lines), text[-3000:]
    else:  # every rank knows the cause from the checkpoint's gathered errors
        assert "unigendet fit: rank 0 stopped: rank 1 failed: OSError: [Errno 27] File too large" in lines, lines
        assert "unigendet fit: rank 1 failed: OSError: [Errno 27] File too large" in lines, lines
    print(f"{kind} on rank {rank}: every rank ended {took:.1f} s after the fault, rc {rc}; " + " | ".join(lines))

    # the previous checkpoint is complete and verified
    from unigendet.checkpoint.loading import load_lightning_checkpoint, safe_torch_load

    last = root / "ckpt" / "last.ckpt"
    load_lightning_checkpoint(last)
    assert safe_torch_load(Path(last) / "meta.pt")["global_step"] == FAULT_STEP - 1  # step 3 was not saved
