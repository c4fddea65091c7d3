"""Functions the SDK's tests deploy: written as a Modal user would, with `import gantry
as modal`."""

import os
import time

import gantry as modal

app = modal.App("sdk-basics")
volume = modal.Volume.from_name("sdk-tests", create_if_missing=True)
secret = modal.Secret.from_dict({"SDK_SECRET": "s3cret"})
# Idle containers go after 2 s: the test node has 2 cores, and a map's containers would
# otherwise hold them for the default minute while the next test's functions wait.
quick = {"scaledown_window": 2}


class Custom(Exception):
    pass


@app.function(**quick)
def square(x):
    return x * x


@app.function(**quick)
def shout(text, suffix="!"):
    print(f"shouting {text}")
    return text.upper() + suffix


@app.function(**quick)
def fail(kind):
    if kind == "value":
        raise ValueError("bad value")
    raise Custom("custom failure")


@app.function(**quick)
def count(n):
    for i in range(n):
        yield i


@app.function(**quick)
def ticks(n, delay):
    for i in range(n):
        print(f"tick {i}")
        yield i
        time.sleep(delay)


@app.function(**quick)
@modal.batched(max_batch_size=4, wait_ms=200)
def double_all(xs):
    return [(x * 2, len(xs)) for x in xs]


@app.function(**quick)
@modal.concurrent(max_inputs=3)
def slow(x):
    time.sleep(0.3)
    return x


@app.function(**quick)
def where():
    return {"local": modal.is_local(), "cwd": os.getcwd()}


@app.function(retries=modal.Retries(max_retries=2, initial_delay=0.0, max_delay=1.0),
              volumes={"/data": volume}, **quick)
def flaky(marker):
    # Fails on the first try of each input, succeeds on the retry: the marker lives in a
    # volume so that the retry (maybe in another container) sees it.
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError("first try fails")
    return "second try"


@app.function(volumes={"/data": volume}, secrets=[secret], **quick)
def volume_and_secret(name, text):
    with open(f"/data/{name}", "w") as f:
        f.write(text + " " + os.environ["SDK_SECRET"])
    volume.commit()
    return sorted(os.listdir("/data"))


@app.cls(**quick)
class Counter:
    start: int = modal.parameter(default=0)

    @modal.enter()
    def setup(self):
        self.calls = 0
        self.entered = time.time()

    @modal.method()
    def bump(self):
        self.calls += 1
        return self.start + self.calls

    @modal.exit()
    def bye(self):
        print("bye")


def hello_wsgi(environ, start_response):
    body = f"{environ['REQUEST_METHOD']} {environ['PATH_INFO']} {environ['QUERY_STRING']}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Gantry-Test", "yes")])
    return [body]


@app.function(**quick)
@modal.wsgi_app()
def web():
    return hello_wsgi


async def hello_asgi(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = (await receive())["body"]
    text = f"{scope['method']} {scope['path']} {scope['query_string'].decode()} {body.decode()}"
    await send({"type": "http.response.start", "status": 201,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": text.encode()})


@app.function(**quick)
@modal.concurrent(max_inputs=4)
@modal.asgi_app(label="asgi-echo")
def asgi():
    return hello_asgi


@app.function(**quick)
@modal.web_server(8000, startup_timeout=10)
def files():
    import subprocess

    subprocess.Popen(["python3", "-m", "http.server", "8000", "--directory", "/root/apps"])


@app.local_entrypoint()
def main(x: int = 3, name: str = "world"):
    print(f"square {square.remote(x)} {shout.remote(name)}")
