"""The function the Python SDK benchmark calls (bench/python_sdk.py): an echo with four
warm containers of eight inputs each, the peer of Ray's four workers."""

import gantry as modal

app = modal.App("sdk-bench")


@app.function(min_containers=4, max_containers=4, cpu=0.5, memory=256)
@modal.concurrent(max_inputs=8)
def echo(x):
    return x
