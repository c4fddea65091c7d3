"""What the SDK makes of Modal-style definitions, without a cluster: the manifest of
each function, the options it ignores with a warning, and the mistakes it refuses."""

import json
import warnings

import pytest

import gantry as modal
from gantry import _app, _image
from gantry.exception import InvalidError


options_app = modal.App("Options_Test")


@options_app.function(gpu=["H100", "A100:2"], memory=2048, timeout=90, startup_timeout=30,
                      retries=modal.Retries(max_retries=3, initial_delay=0.5), min_containers=1,
                      max_containers=5, buffer_containers=1, scaledown_window=120,
                      env={"A": "1"}, schedule=modal.Cron("0 * * * *"))
@modal.concurrent(max_inputs=8, target_inputs=6)
def optioned(x):
    return x


web_app = modal.App("web")


@web_app.function()
@modal.wsgi_app(label="Site")
def site():
    pass


@web_app.function()
@modal.web_server(8080, startup_timeout=20, requires_proxy_auth=True)
def server():
    pass


cls_app = modal.App("cls")


@cls_app.cls()
class Model:
    size: int = modal.parameter(default=3)
    name: str = modal.parameter()

    @modal.enter()
    def load(self):
        self.loaded = self.size * 2

    @modal.method()
    def describe(self):
        return f"{self.name} {self.loaded}"


_other_python = "3.13" if _image.local_python() == "3.11" else "3.11"
py_app = modal.App("py", image=modal.Image.debian_slim(_other_python))


@py_app.function()
def on_other_python():
    pass


def lonely_plain():
    pass


def manifest_of(app, tag):
    return app._function_manifest(app._objects[tag], tag, "img:1", [], {}, [])


def test_function_options_become_the_manifest():
    app = options_app
    m = manifest_of(app, "optioned")
    assert m["gpu"] == ["H100:1", "A100:2"]
    assert (m["memory"], m["cpu"], m["timeout"], m["startup_timeout"]) == ("2048M", "0.125", "90s", "30s")
    assert m["retries"] == {"max_retries": 3, "backoff_coefficient": 2.0,
                            "initial_delay": "500ms", "max_delay": "60s"}
    assert (m["min_containers"], m["max_containers"], m["buffer_containers"]) == (1, 5, 1)
    assert (m["scaledown_window"], m["max_inputs"], m["target_inputs"]) == ("120s", 8, 6)
    assert m["schedule"] == {"cron": "0 * * * *", "timezone": "UTC"}
    assert m["env"] == {"A": "1"}
    spec = json.loads(m["command"][-1])
    assert spec["module"] == __name__ and spec["object"] == "optioned"
    assert spec["python"] == _image.local_python()
    assert app._default_name() == "options-test"


def test_web_endpoints_become_the_web_table():
    app = web_app
    assert manifest_of(app, "site")["web"] == {
        "public": True, "label": "site", "via": "runtime_api", "max_concurrency": 1,
        "target_concurrency": 1}
    m = manifest_of(app, "server")
    assert m["web"] == {"public": False, "label": "server", "via": "port", "port": 8080,
                        "max_concurrency": 1, "target_concurrency": 1}
    assert m["startup_timeout"] == "45s"
    assert "max_inputs" not in m


def test_options_without_meaning_warn_and_unknown_ones_are_refused():
    app = modal.App("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        app.function(region="us-east", cloud="aws", enable_memory_snapshot=True)(lonely_plain)

    assert sorted(str(w.message).split("`")[1] for w in caught) == [
        "cloud", "enable_memory_snapshot", "region"]
    with pytest.raises(TypeError, match="no_such_option"):
        app.function(no_such_option=1)


def test_mistakes_are_refused_with_what_to_do():
    with pytest.raises(InvalidError, match="3.11"):
        modal.Image.debian_slim("3.12")
    with pytest.raises(InvalidError, match="five fields"):
        modal.Cron("every hour")
    with pytest.raises(InvalidError, match="max_retries"):
        modal.Retries(max_retries=11)
    with pytest.raises(InvalidError, match="Cron"):
        modal.Period(months=1)
    app = modal.App("bad")
    with pytest.raises(InvalidError, match="top level"):
        @app.function()
        def outer():
            @app.function()
            def inner():
                pass
        outer()
    with pytest.raises(InvalidError, match="schedule"):
        app.function(schedule=modal.Period(hours=1))(modal.asgi_app()(lonely_plain))
    with pytest.raises(InvalidError, match="@method"):
        app.cls()(type("NoMethods", (), {}))
    with pytest.raises(InvalidError, match="not deployed"):
        modal.App("other").function()(lonely_plain).remote()


def test_a_class_takes_its_parameters_by_keyword():
    assert Model(name="m").describe.local() == "m 6"
    assert Model(name="m", size=5)._params == {"name": "m", "size": 5}
    with pytest.raises(InvalidError, match="needs parameter `name`"):
        Model()
    with pytest.raises(InvalidError, match="no parameter"):
        Model(name="m", colour="red")
    with pytest.raises(AttributeError):
        Model(name="m").load


def test_an_image_of_another_python_is_refused_at_deploy():
    with pytest.raises(InvalidError, match=f"Python {_other_python}"):
        py_app._manifest(None, "py", None)


def test_app_names_become_dns_labels():
    assert _app.app_name_of("My_App v2") == "my-app-v2"
    with pytest.raises(InvalidError):
        _app.app_name_of("___")
