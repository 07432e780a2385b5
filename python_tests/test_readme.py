"""The README's example runs as written and does what it says."""

import re
from pathlib import Path

import torch

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


def test_readme_transformers_example_runs(tmp_path):
    from hf_families import moe_blocks, tiny_model
    from transformers import TrainingArguments

    from moe_kernels.integrations.transformers.experts import FusedExperts
    from moe_kernels.integrations.transformers.routing import FusedRouter

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (block,) = [b for b in blocks if "LossFreeBalancingCallback()" in b]
    pretrained = 'AutoModelForCausalLM.from_pretrained("Qwen/Qwen3-30B-A3B")'
    assert pretrained in block
    ids = torch.randint(3, 96, (16, 12), generator=torch.Generator().manual_seed(0))
    scope: dict = {
        "tiny_model": tiny_model,
        "args": TrainingArguments(
            output_dir=str(tmp_path), max_steps=3, logging_steps=1, report_to=[], use_cpu=True
        ),
        "data": [{"input_ids": row, "labels": row} for row in ids],
    }
    exec(compile(block.replace(pretrained, 'tiny_model("qwen3_moe")'), "README.md", "exec"), scope)
    model, trainer = scope["model"], scope["trainer"]
    assert scope["replaced"] == len(moe_blocks(model)) == 2
    logged = [entry for entry in trainer.state.log_history if "maxvio_batch" in entry]
    assert [entry["step"] for entry in logged] == [1, 2, 3]
    assert not any(isinstance(m, (FusedRouter, FusedExperts)) for m in model.modules())
