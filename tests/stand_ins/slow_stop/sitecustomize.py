"""On the PYTHONPATH of one test's runs: the first training script started with DRM_TEST_SLOW_STOP (a path it
claims) in its environment holds each of its fsyncs until its SIGUSR2 has come, and then takes 16 s for each: a
run whose checkpoint write, as one with a 21 GB replay on a busy filesystem, outlasts the time its task waits
for it after a time limit's signal. Every other process is left as it is."""

import os
import signal
import sys
import time

claim = os.environ.get("DRM_TEST_SLOW_STOP")
if claim and os.path.basename(sys.argv[0]).startswith("drm"):
    try:
        os.close(os.open(claim, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        claim = None
if claim:
    signalled, real_signal, real_fsync = [], signal.signal, os.fsync

    def recording_signal(signum, handler):
        if signum == signal.SIGUSR2 and callable(handler):
            return real_signal(signum, lambda *args: (signalled.append(1), handler(*args)))
        return real_signal(signum, handler)

    def slow_fsync(descriptor):
        while not signalled:
            time.sleep(0.1)
        time.sleep(16)
        real_fsync(descriptor)

    signal.signal, os.fsync = recording_signal, slow_fsync
