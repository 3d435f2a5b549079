"""Reads an lcasr TensorBoard event file with TensorBoard's own loader and
prints every scalar as `tag step value`, one per line (used by the run tests
when a Python with the `tensorboard` package is available)."""
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
for tag in sorted(acc.Tags()["scalars"]):
    for event in acc.Scalars(tag):
        print(tag, event.step, repr(event.value))
