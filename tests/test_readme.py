"""The README's two commands cannot rot: CI runs the test command verbatim, and the demo
command's parts exist and are wired (the demo itself runs in tests/test_demo.py)."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert block, "README lost its first bash block (the two commands)"
    return [line for line in block.group(1).splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_two_commands():
    commands = readme_commands()
    assert len(commands) == 2, commands
    assert commands[0] == "pip install -e . && streamssm demo"


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = readme_commands()[1]
    assert "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_demo_command_is_installed():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["streamssm"] == "streamssm.cli:main"
    from streamssm.cli import COMMANDS

    assert "demo" in COMMANDS


def test_readme_state_example_runs():
    block = re.search(r"## The recurrent state\n\n```python\n(.*?)```", README, re.S)
    assert block, "README lost its recurrent-state example"
    exec(compile(block.group(1), "README.md", "exec"), {})


def test_readme_kernel_example_runs():
    """It called ``ssd_scan`` on names it never defined (NameError for a reader who ran it)."""
    block = re.search(r"## Kernels\n\n```python\n(.*?)```", README, re.S)
    assert block, "README lost its kernel example"
    names: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), names)
    assert names["y"].shape == names["x"].shape and names["h"].shape == names["h0"].shape


def test_readme_links_exist():
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), f"README links to missing {target}"
