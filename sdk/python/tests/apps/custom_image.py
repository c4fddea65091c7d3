"""An image built in the cluster from steps written in Python."""

import os

import gantry as modal

image = (
    modal.Image.debian_slim()
    .run_commands("echo built > /built.txt")
    .pip_install("six", "fastapi")
    .env({"GREETING": "hi"})
    .add_local_file(os.path.join(os.path.dirname(__file__), "data.txt"), "/opt/data.txt")
    .add_local_dir(os.path.join(os.path.dirname(__file__), "assets"), "/opt/assets")
    .add_local_python_source("sdk_helper")
)
app = modal.App("sdk-image", image=image)


@app.function()
def inspect_image():
    import six  # installed by pip_install

    import sdk_helper

    with open("/built.txt") as a, open("/opt/data.txt") as b, open("/opt/assets/a.txt") as c:
        return {
            "built": a.read().strip(),
            "data": b.read().strip(),
            "asset": c.read().strip(),
            "greeting": os.environ["GREETING"],
            "six": six.__name__,
            "helper": sdk_helper.greet("image"),
        }


@app.function(scaledown_window=2)
@modal.fastapi_endpoint(method="POST")
def square(item: dict):
    return {"square": item["x"] ** 2}
