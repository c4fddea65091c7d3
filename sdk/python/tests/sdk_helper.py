"""A local module the custom image's app adds with `add_local_python_source`."""


def greet(name):
    return f"hello {name}"
