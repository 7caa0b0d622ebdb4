"""Two processes on loopback (jax.distributed, CPU, 2 fake devices each) run the training
loop on `tiny` and reach the loss of one process with the same global batch; only
process 0 logs; both write one multi-host orbax checkpoint."""

import os

import numpy as np
import portpicker

from tests.support.workers import finish, start


def test_two_processes_match_one(tmp_path):
    port = portpicker.pick_unused_port()
    run = tmp_path / "run2"
    procs = [start(["train", tmp_path / f"p{i}.json", run, i, port], devices=2) for i in range(2)]
    single = start(["train", tmp_path / "single.json", tmp_path / "run1"], devices=1)
    p0, p1 = (finish(p, tmp_path / f"p{i}.json") for i, p in enumerate(procs))
    ref = finish(single, tmp_path / "single.json")
    assert (p0["processes"], p0["devices"], ref["processes"]) == (2, 4, 1)
    assert p0["step"] == p1["step"] == ref["step"] == 4
    np.testing.assert_allclose([p0["loss"], p1["loss"]], ref["loss"], rtol=1e-5)
    assert p0["logs"] and not p1["logs"]  # process 0 only
    assert os.path.isdir(run / "checkpoints" / "4")
