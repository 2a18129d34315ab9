"""The evaluation worker processes of every script (RUN OPERATIONS: speed): what stops a run when they
fail. That they return what the in-process evaluation returns, resume bit-identically and end with
the run is checked on real runs in tests/test_checkpoints.py."""

import ctypes.util
import os
import signal

import pytest

import drm
import drm_adroit
import drm_metaworld

ENV_ARGS = {
    drm: ("cartpole-balance", 1, 8, 3),
    drm_adroit: ("hammer", 1, 4, 1),
    drm_metaworld: ("reach", 1, 10, 3, 1024),
}


@pytest.mark.skipif(ctypes.util.find_library("OSMesa") is not None, reason="OSMesa is installed here")
@pytest.mark.parametrize("script", list(ENV_ARGS), ids=lambda script: script.__name__)
def test_a_worker_that_cannot_render_stops_the_run_with_one_line(script, monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "osmesa")  # what the spawned worker starts with; this process keeps EGL
    with pytest.raises(SystemExit) as stop:
        script.EvaluationWorkers(1, ENV_ARGS[script])
    message = str(stop.value)
    assert message.startswith(f"{script.__name__}.py: evaluation worker 0: ") and "\n" not in message
    assert "MUJOCO_GL=osmesa" in message and "apt-get install -y --no-install-recommends libegl1" in message


def test_a_worker_that_dies_stops_the_run_with_one_line():
    workers = drm.EvaluationWorkers(2, ENV_ARGS[drm])
    try:
        networks = drm.make_networks((9, 84, 84), 1, drm.Args(feature_dim=4, hidden_dim=8), "cpu")
        dead = workers.processes[1]
        os.kill(dead.pid, signal.SIGKILL)
        with pytest.raises(SystemExit) as stop:
            workers(networks, drm.eval_episode_seeds(1, 0, 4), "cpu")
        assert str(stop.value) == f"drm.py: evaluation worker 1 (pid {dead.pid}) died with exit code -9"
    finally:
        workers.close()
