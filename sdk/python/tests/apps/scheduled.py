"""A scheduled function: every 2 s it appends a line to a volume."""

import time

import gantry as modal

app = modal.App("sdk-scheduled")
volume = modal.Volume.from_name("sdk-ticks", create_if_missing=True)


@app.function(schedule=modal.Period(seconds=2), volumes={"/data": volume})
def tick():
    with open("/data/ticks", "a") as f:
        f.write(f"{time.time()}\n")
