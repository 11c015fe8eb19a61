"""The README's code blocks run as written: a user copies them."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def _blocks():
    text = open(README).read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_readme_block_runs(index):
    import torch

    torch._dynamo.reset()
    exec(compile(_blocks()[index], f"README.md block {index}", "exec"), {})
