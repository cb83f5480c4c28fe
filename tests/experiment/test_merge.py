"""The weight-merging baseline equals the average of the state dicts; mismatches are refused."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from fuseserve.experiment.merge import average_state_dicts, merge_models
from fuseserve.teacher.tiny import save_tiny_llama


def test_average_of_state_dicts():
    a = {"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor([3])}
    b = {"w": torch.tensor([3.0, 6.0]), "steps": torch.tensor([3])}
    merged = average_state_dicts([a, b])
    assert torch.equal(merged["w"], torch.tensor([2.0, 4.0]))
    assert torch.equal(merged["steps"], torch.tensor([3]))
    with pytest.raises(ValueError, match="shapes differ"):
        average_state_dicts([a, {"w": torch.zeros(3), "steps": torch.tensor([3])}])
    with pytest.raises(ValueError, match="other parameters"):
        average_state_dicts([a, {"w": torch.zeros(2)}])


def test_merged_model_is_the_parameter_average(tmp_path, mistral_tok, smol_tok):
    dirs = [save_tiny_llama(mistral_tok, tmp_path / f"m{i}", seed=i, hidden=32) for i in range(3)]
    out = merge_models([str(d) for d in dirs], tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    parts = [AutoModelForCausalLM.from_pretrained(d).state_dict() for d in dirs]
    for key, value in merged.items():
        expected = (parts[0][key] + parts[1][key] + parts[2][key]) / 3
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
    other = save_tiny_llama(smol_tok, tmp_path / "other", seed=0, hidden=32)
    with pytest.raises(ValueError, match="another configuration"):
        merge_models([str(dirs[0]), str(other)], tmp_path / "bad")
