"""Every Python block of README.md runs, on a tiny random checkpoint in place of the model path."""

import os
import re

import pytest
from tiny_checkpoints import make_sd

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
MODEL_PATH = re.compile(r"""(["'])/models/[^"']+\1""")


def python_blocks() -> list[str]:
    with open(README, encoding="utf-8") as f:
        return re.findall(r"^```python\n(.*?)^```", f.read(), flags=re.S | re.M)


def test_the_readme_has_python_blocks():
    assert python_blocks(), "README.md lost its Python examples"


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs(index, tmp_path_factory, monkeypatch):
    root = str(tmp_path_factory.mktemp("sd"))
    make_sd(root, "sd1")
    code = MODEL_PATH.sub(repr(root), python_blocks()[index])
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
