"""What the wheel is made of, checked from the checkout (fast; `tests/test_wheel.py` installs the real one):
one import name, a package list that matches the tree, every example shipped, one version, and the
`prunevid` command's version and listening address."""

from __future__ import annotations

import json
import re
from fnmatch import fnmatch
from pathlib import Path

import pytest
import tomllib

import prunevid
from prunevid.cli import main

ROOT = Path(__file__).resolve().parents[1]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_the_package_list_is_the_tree_under_one_name():
    """A package the list forgets would be missing from the wheel (folders mapped by hand are not found)."""
    mapped = SETUPTOOLS["package-dir"]
    library = {
        ".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "prunevid").rglob("__init__.py")
    }
    assert set(SETUPTOOLS["packages"]) == library | set(mapped)
    assert all(name.startswith("prunevid.") for name in mapped)
    for name, folder in mapped.items():
        assert (ROOT / folder).is_dir(), name
    assert "__pycache__" not in " ".join(SETUPTOOLS["packages"])


def test_every_example_and_its_credits_are_package_data():
    patterns = SETUPTOOLS["package-data"]["prunevid.assets"]
    rows = json.loads((ROOT / "assets" / "examples.json").read_text())
    for name in ["examples.json", "README.md", *(row["video"] for row in rows)]:
        assert (ROOT / "assets" / name).is_file(), name
        assert any(fnmatch(name, pattern) for pattern in patterns), name


def test_the_page_finds_the_examples_beside_its_folder():
    from prunevid.app.ui import ASSETS, examples

    assert ASSETS == ROOT / "assets"
    rows = json.loads((ASSETS / "examples.json").read_text())
    assert examples() == [[str(ROOT / "assets" / row["video"]), row["question"]] for row in rows]


def test_version_is_read_from_the_package_and_listed_in_the_changelog(capsys):
    assert SETUPTOOLS["dynamic"]["version"] == {"attr": "prunevid.__version__"}
    assert "version" not in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"prunevid {prunevid.__version__}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+", prunevid.__version__)
    assert re.search(rf"^## {re.escape(prunevid.__version__)} ", (ROOT / "CHANGELOG.md").read_text(), re.M)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], (None, None)),  # Gradio then reads GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, else its defaults
        (["--host", "0.0.0.0", "--port", "8123"], ("0.0.0.0", 8123)),
    ],
)
def test_demo_listens_where_asked_else_where_gradio_says(monkeypatch, flags, expected):
    import prunevid.app

    calls = []
    monkeypatch.setattr(prunevid.app, "launch", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setenv("GRADIO_SERVER_PORT", "9999")  # not ours to read: the flag or Gradio decides
    assert main(["demo", *flags]) == 0
    assert [(call["server_name"], call["server_port"]) for call in calls] == [expected]
