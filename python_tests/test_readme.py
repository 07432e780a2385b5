"""The README's example runs as written and does what it says."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_ops_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no python example"
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    T, H, E, k = (scope[name] for name in ("T", "H", "E", "k"))
    assert scope["y"].shape == (T, H)
    assert scope["w_in"].grad is not None and scope["w_out"].grad is not None
    assert int(scope["counts"].sum()) == T * k
    # The bias moved: down for experts above the mean load, up for those below.
    counts, bias = scope["counts"], scope["bias"]
    mean = counts.double().mean()
    assert bool(((bias < 0) == (counts > mean)).all()) and bool(
        ((bias > 0) == (counts < mean)).all()
    )
    assert len(bias) == E


def test_readme_layer_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (block,) = [b for b in blocks if "step_counts = update_balance(layer)" in b]
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    layer, step_counts = scope["layer"], scope["step_counts"]
    assert [int(c.sum()) for c in step_counts] == [4 * 8 * 64 * 2]  # all 4 micro-batches
    assert int(layer.balancer.updates) == 1 and bool(layer.balancer.bias.ne(0).any())
    assert int(layer.balancer.tokens_per_expert.sum()) == 0  # the next step starts from zero
