"""Third-party code shipped inside the SDK, so that function containers need nothing
pip-installed: cloudpickle 3.1.1 (BSD-3-Clause, its licence in the header of
cloudpickle/cloudpickle.py), copied unchanged from its wheel on PyPI."""
