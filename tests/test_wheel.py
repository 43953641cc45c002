"""The built artifacts as a user gets them: the wheel installed with the `app` extra into a clean
virtual environment (no system packages), used through its commands from a folder outside the
repository: one import name, the version, `prunevid answer` and `prunevid demo` on the shipped examples.

Needs what `.ci/wheel` makes (it builds the sdist and the wheel from it, checks both with twine and
installs the wheel; PRUNEVID_WHEEL_VENV names that venv, PRUNEVID_WHEEL_DIST the folder with the sdist
and wheel); skipped otherwise. Run: `bash .ci/wheel`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tarfile
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

VENV = os.environ.get("PRUNEVID_WHEEL_VENV", "")
DIST = os.environ.get("PRUNEVID_WHEEL_DIST", "")
pytestmark = pytest.mark.skipif(
    not (VENV and DIST),
    reason="tests the built wheel in a clean venv: run `bash .ci/wheel` (it sets PRUNEVID_WHEEL_VENV and _DIST)",
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = json.loads((ROOT / "assets" / "examples.json").read_text())
OFFLINE_EXAMPLES = [row for row in EXAMPLES if row.get("model") == "tiny-trained"]


def artifact(suffix: str) -> Path:
    (path,) = Path(DIST).glob(f"prunevid-*{suffix}")
    return path


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """A working folder outside the repository (nothing there to import by accident)."""
    folder = tmp_path_factory.mktemp("user")
    assert ROOT not in folder.parents
    return folder


@pytest.fixture(scope="module")
def environment(outside) -> dict[str, str]:
    """The user's environment: no path into the repository, no Hub access, an empty Hub cache."""
    dropped = ("PYTHONPATH", "VIRTUAL_ENV", "PRUNEVID_MODEL", "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT")
    return {
        **{key: value for key, value in os.environ.items() if key not in dropped},
        "HF_HOME": str(outside / "hf"),
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_TEMP_DIR": str(outside / "gradio"),
    }


def run(environment: dict[str, str], cwd: Path, command: str, *args: str) -> str:
    """A command of the wheel's venv (`python` or a console script); its stdout."""
    done = subprocess.run(
        [str(Path(VENV) / "bin" / command), *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def installed_assets(environment, outside) -> Path:
    """Where the installed page finds its examples (its own lookup, not a path computed here)."""
    path = Path(
        run(environment, outside, "python", "-c", "import prunevid.app.ui as u; print(u.ASSETS)").strip()
    )
    assert Path(VENV).resolve() in path.resolve().parents, path
    return path


def test_the_wheel_adds_one_import_name(environment, outside):
    names = zipfile.ZipFile(artifact(".whl")).namelist()
    tops = {name.split("/")[0] for name in names}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"prunevid"}
    assert "prunevid/app/ui.py" in names and "prunevid/visualizations/overlay.py" in names

    probe = (
        "import importlib.metadata as m, importlib.util as u, json\n"
        "names = ['app', 'visualizations', 'assets', 'tests', 'scripts', 'docs']\n"
        "print(json.dumps({'absent': [n for n in names if u.find_spec(n) is None],\n"
        "                  'files': sorted({str(f).split('/')[0] for f in m.files('prunevid')}),\n"
        "                  'scripts': sorted(str(f) for f in m.files('prunevid') if str(f).startswith('..'))}))"
    )
    found = json.loads(run(environment, outside, "python", "-c", probe))
    assert found["absent"] == ["app", "visualizations", "assets", "tests", "scripts", "docs"]
    assert [
        name for name in found["files"] if name not in ("..", "prunevid") and ".dist-info" not in name
    ] == []
    assert sorted(Path(path).name for path in found["scripts"]) == ["prunevid", "prunevid-eval-tasks-path"]


def test_version_has_one_source(environment, outside):
    import prunevid

    assert Path(prunevid.__file__).resolve().parent == ROOT / "prunevid"  # the source, not the install
    assert run(environment, outside, "prunevid", "--version").strip() == f"prunevid {prunevid.__version__}"
    metadata = run(
        environment, outside, "python", "-c", "import importlib.metadata as m; print(m.version('prunevid'))"
    )
    assert metadata.strip() == prunevid.__version__
    assert artifact(".whl").name == f"prunevid-{prunevid.__version__}-py3-none-any.whl"


def test_the_sdist_holds_the_build_inputs_only():
    with tarfile.open(artifact(".tar.gz")) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    needed = {
        "pyproject.toml",
        "README.md",
        "LICENSE",
        "CHANGELOG.md",
        "app/ui.py",
        "visualizations/overlay.py",
        "prunevid/weights/tiny/model.safetensors",
        "assets/examples.json",
        "assets/README.md",  # the Big Buck Bunny credit travels with the clip
        *(f"assets/{row['video']}" for row in EXAMPLES),
    }
    assert needed <= names, needed - names
    assert not [name for name in names if name.split("/")[0] in ("tests", "scripts", "docs")]


def test_the_installed_examples_are_the_spaces(installed_assets):
    assert (installed_assets / "examples.json").read_bytes() == (
        ROOT / "assets" / "examples.json"
    ).read_bytes()
    for row in EXAMPLES:
        assert (installed_assets / row["video"]).read_bytes() == (ROOT / "assets" / row["video"]).read_bytes()


def test_answer_a_shipped_example_from_outside_the_repository(environment, outside, installed_assets):
    row = OFFLINE_EXAMPLES[0]
    video = installed_assets / row["video"]
    out = run(
        environment, outside, "prunevid", "answer", str(video), row["question"], "--model", "tiny-trained"
    )
    assert out.splitlines()[0].strip() == row["answer"]
    assert (
        "visual tokens: 288 ->" in out
    )  # 8 frames x 6 x 6 tokens: the model's preset, not the library default


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo(environment, outside):
    """`prunevid demo` placed by Gradio's variables alone (no flags); stopped by its process id."""
    port = free_port()
    log_path = outside / "demo.log"
    env = {**environment, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port)}
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [str(Path(VENV) / "bin" / "prunevid"), "demo"], cwd=outside, env=env, stdout=log, stderr=log
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        assert process.poll() is None, f"prunevid demo exited:\n{log_path.read_text()}"
        assert time.monotonic() < deadline, f"prunevid demo did not answer on {url}:\n{log_path.read_text()}"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    yield url
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()


def test_the_demo_shows_the_spaces_banner_and_examples(demo, monkeypatch):
    from prunevid.app.catalog import OFFLINE_MODEL
    from prunevid.app.models import fallback_message
    from prunevid.app.ui import banner_markdown
    from prunevid.pipeline import DEFAULT_MODEL, ModelLoadError, load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as the demo runs: the default model is not here
    with pytest.raises(ModelLoadError) as missing:
        load_model(DEFAULT_MODEL)

    with urllib.request.urlopen(demo + "config", timeout=30) as response:
        components = [c.get("props", {}) | {"type": c["type"]} for c in json.load(response)["components"]]
    (banner,) = [c["value"] for c in components if c.get("elem_id") == "prunevid-banner"]
    # what the repository's page shows without the default model's weights
    assert banner == banner_markdown(
        OFFLINE_MODEL, fallback_message(missing.value, "the offline tiny demo model")
    )
    assert DEFAULT_MODEL in banner and "trained only on synthetic shape videos" in banner
    (samples,) = [c["samples"] for c in components if c["type"] == "dataset"]
    assert [(video["orig_name"], question) for video, question in samples] == [
        (row["video"], row["question"]) for row in EXAMPLES
    ]


def test_the_demo_answers_an_example_through_gradio_client(demo, installed_assets):
    from gradio_client import Client, handle_file

    row = OFFLINE_EXAMPLES[1]
    client = Client(demo, verbose=False)
    out = client.predict(
        handle_file(str(installed_assets / row["video"])), row["question"], api_name="/answer"
    )
    assert out[0].strip() == row["answer"]
