import time

from vqlm.bench import lm


def test_best_step_seconds_warms_up_then_takes_the_best_run_per_step():
  calls, syncs, delays = [], [], iter([0.0, 0.0] + [0.02] * 3 + [0.0] * 3)

  def step():
    calls.append(1)
    time.sleep(next(delays))

  seconds = lm.best_step_seconds(step, steps=3, repeats=2, sync=lambda: syncs.append(1))
  assert len(calls) == 2 + 2 * 3 and len(syncs) == 1 + 2
  # The second run (no sleeps) is the best: well under the first run's 20 ms per step.
  assert 0.0 <= seconds < 0.01
