"""The README's and docs/guide.md's code blocks run as written: a user copies them."""

import os
import re

import pytest

HERE = os.path.dirname(__file__)
DOCS = [os.path.join(HERE, "..", "README.md"), os.path.join(HERE, "..", "docs", "guide.md")]


def _blocks():
    return [(os.path.basename(path), i, block) for path in DOCS
            for i, block in enumerate(re.findall(r"```python\n(.*?)```", open(path).read(),
                                                 flags=re.S))]


@pytest.mark.parametrize("doc,index,block", _blocks(), ids=lambda v: str(v)[:20])
def test_readme_block_runs(doc, index, block):
    import torch

    torch._dynamo.reset()
    exec(compile(block, f"{doc} block {index}", "exec"), {})
