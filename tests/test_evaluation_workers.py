"""The evaluation worker processes of every script (RUN OPERATIONS: speed): what a run does when they fail.
That they return what the in-process evaluation returns, resume bit-identically and end with the run is
checked on real runs in tests/test_checkpoints.py."""

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


def tiny_networks(script):
    env = script.make_env(*ENV_ARGS[script])
    shape, action_dim = env.observation_shape, env.action_dim
    env.close()
    return script.make_networks(shape, action_dim, script.Args(feature_dim=4, hidden_dim=8), "cpu")


def in_process(script, networks, seeds):
    env = script.make_env(*ENV_ARGS[script])
    try:
        return script.evaluate(env, networks, seeds, "cpu")
    finally:
        env.close()


@pytest.mark.skipif(ctypes.util.find_library("OSMesa") is not None, reason="OSMesa is installed here")
@pytest.mark.parametrize("script", list(ENV_ARGS), ids=lambda script: script.__name__)
def test_workers_that_cannot_render_are_replaced_once_then_the_run_evaluates_in_its_own_process(script, monkeypatch, capsys):
    networks, seeds = tiny_networks(script), script.eval_episode_seeds(1, 0, 1)
    expected = in_process(script, networks, seeds)  # this process renders with EGL, as a run's main process does
    monkeypatch.setenv("MUJOCO_GL", "osmesa")  # what the spawned workers start with
    workers = script.EvaluationWorkers(1, ENV_ARGS[script])
    try:
        assert workers(networks, seeds, "cpu") == expected
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == 2 and all(line.startswith("evaluation: evaluation worker ") for line in lines)
        assert "MUJOCO_GL=osmesa" in lines[0] and "apt-get install -y --no-install-recommends libegl1" in lines[0]
        assert lines[0].endswith("; replacing the workers and evaluating again")
        assert lines[1].endswith("; evaluating in this process from now on")
        assert workers.processes == []  # and no worker is started again
        assert workers(networks, seeds, "cpu") == expected and capsys.readouterr().out == ""
    finally:
        workers.close()


def test_a_worker_that_dies_or_falls_silent_is_replaced_and_its_evaluation_made_again_to_the_same_value(capsys):
    # one worker, and a silence limit of 5 s, so that a stopped worker is found out quickly
    workers = drm.EvaluationWorkers(1, ENV_ARGS[drm], min_silence_s=5)
    try:
        networks, seeds = tiny_networks(drm), drm.eval_episode_seeds(1, 0, 2)
        expected = in_process(drm, networks, seeds)
        workers._start()  # as the first evaluation does
        dead = workers.processes[0]
        os.kill(dead.pid, signal.SIGKILL)
        assert workers(networks, seeds, "cpu") == expected
        assert capsys.readouterr().out == (
            f"evaluation: evaluation worker 0 (pid {dead.pid}) died with exit code -9; replacing the workers and evaluating again\n"
        )
        assert dead not in workers.processes and all(process.is_alive() for process in workers.processes)
        assert workers.longest_episode_s > 0  # the silence limit grows with the episodes it has seen

        workers.longest_episode_s = 0.5  # the limit is then max(5 s, twice the longest episode seen)
        silent = workers.processes[0]
        os.kill(silent.pid, signal.SIGSTOP)
        assert workers(networks, seeds, "cpu") == expected
        assert capsys.readouterr().out == (
            f"evaluation: evaluation worker 0 (pid {silent.pid}) was silent for 5 s; replacing the workers and evaluating again\n"
        )
        silent.join(5)
        assert silent.exitcode == -signal.SIGKILL  # a stopped worker is killed, not waited for
    finally:
        workers.close()
