"""Installing without PyPI (issue 20): cskd-cache has no release there yet, so the README installs it from the
repository or from a wheel built from it. An editable install finds every module by path; a wheel holds only the
packages pyproject.toml lists, so each sub-package must be listed (a wheel without them fails at `import`)."""

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_a_wheel_holds_every_package():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = setup["package-dir"]
    wanted = set()
    for name, folder in dirs.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            if "__pycache__" not in init.parts:
                rel = init.parent.relative_to(ROOT / folder).parts
                wanted.add(".".join((name, *rel)))
    assert wanted - set(setup["packages"]) == set(), "list them in [tool.setuptools] packages"


def test_the_readme_installs_from_the_repository():
    readme = (ROOT / "README.md").read_text()
    install = readme.split("## Install", 1)[1].split("\n## ", 1)[0]
    assert 'pip install -e ".[test]"' in install and "python -m pytest -q" in install
    assert "not on PyPI" in install and "pip wheel" in install  # until a release exists
    assert "nginx" not in install.split("```")[1]  # the two commands are all the set-up
    assert 'pip install "cskd-cache[demo]"' not in readme
