"""Dependencies are declared as used: every third-party import is declared in pyproject.toml
(module-level imports of the core library in its core dependencies), requirements.txt (what a
Space installs) holds the core and `app` dependencies with the same version ranges, and pins
torch only, to a version inside pyproject's range."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"prunevid", "app", "visualizations"}
# The eval extra lives in its own environment (.ci/eval): its import names, by distribution.
NOT_INSTALLED_HERE = {"lmms_eval": "lmms-eval", "accelerate": "accelerate", "vllm": "vllm"}


def requirements(lines: list[str]) -> dict[str, Requirement]:
    parsed = [Requirement(line) for line in lines]
    return {canonicalize_name(r.name): r for r in parsed if r.name != "prunevid"}


def pyproject() -> tuple[dict[str, Requirement], dict[str, dict[str, Requirement]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {name: requirements(lines) for name, lines in project["optional-dependencies"].items()}
    return requirements(project["dependencies"]), extras


def requirements_txt() -> dict[str, Requirement]:
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    return requirements([line for line in lines if line])


def imports(path: Path, module_level_only: bool) -> set[str]:
    """Top-level names of the third-party modules `path` imports."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {name for name in names if name not in sys.stdlib_module_names and name not in FIRST_PARTY}


@functools.cache
def installed() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def distributions(module: str) -> set[str]:
    found = installed().get(module, [])
    names = {canonicalize_name(name) for name in found}
    if module in NOT_INSTALLED_HERE:
        names.add(canonicalize_name(NOT_INSTALLED_HERE[module]))
    assert names, f"{module} is imported but no installed distribution provides it"
    return names


def sources(*folders: str) -> list[Path]:
    return [path for folder in folders for path in (ROOT / folder).rglob("*.py")]


def test_every_import_is_declared():
    core, extras = pyproject()
    declared = set(core).union(*extras.values())
    files = [*sources("prunevid", "app", "visualizations"), ROOT / "app.py"]
    missing = {
        (path.relative_to(ROOT).as_posix(), module)
        for path in files
        for module in imports(path, module_level_only=False)
        if not distributions(module) & declared
    }
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"


def test_the_core_library_imports_only_core_dependencies_at_module_level():
    core, _ = pyproject()
    library = [path for path in sources("prunevid") if "integrations" not in path.parts]
    missing = {
        (path.relative_to(ROOT).as_posix(), module)
        for path in library
        for module in imports(path, module_level_only=True)
        if not distributions(module) & set(core)
    }
    assert not missing, f"the core imports these at module level without declaring them: {sorted(missing)}"


def test_requirements_txt_repeats_pyprojects_ranges_and_pins_torch_inside_them():
    core, extras = pyproject()
    space = requirements_txt()
    wanted = {**core, **extras["app"]}
    assert set(space) == set(wanted), "requirements.txt must hold exactly the core and app dependencies"
    for name, requirement in wanted.items():
        if name == "torch":
            (pin,) = space[name].specifier
            assert pin.operator == "==" and requirement.specifier.contains(pin.version)
        elif name == "transformers":  # the page needs the adapter's 5.24; the package allows vLLM's older pin
            assert space[name].specifier == SpecifierSet(">=5.24,<6") and requirement.specifier.contains(
                "5.24.0"
            )
            assert not requirement.specifier.contains("6.0"), "one major version"
        else:
            assert space[name].specifier == requirement.specifier, name
    for name in ("transformers", "gradio"):
        assert str(wanted[name].specifier) not in ("", None), f"{name} needs a range"
    assert extras["test"]["spaces"].specifier == space["spaces"].specifier
