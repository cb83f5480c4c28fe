"""In-process Hugging Face backend: any ``AutoModelForCausalLM`` on CPU or CUDA.

Covers loading (local directory, hub id, ``.gguf`` file, or ``shipped:smollm2``), tokenising with
offsets, and scoring a padded batch in one forward pass. Top-k and gold log-probs are computed on
the device in chunks of positions (``log_softmax`` of at most [chunk, vocab] in fp32 at a time), so
no full [tokens, vocab] fp32 copy exists beyond the logits the forward returns.

Leaves out: batching policy (``batcher``) and transport (``server``).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from fuseserve.batching import pad_ids
from fuseserve.loading import resolve_model_spec
from fuseserve.teacher.backend import BackendInfo, LocalTokenizer, TokenizedText
from fuseserve.teacher.errors import InvalidRequest
from fuseserve.wire.messages import TeacherScores
from fuseserve.wire.tokenizer import TokenizerIdentity

log = logging.getLogger(__name__)


def local_revision(folder: Path) -> str:
    """A revision for a local model directory that changes when its weights change (names,
    sizes and modification times of the weight files), so cached scores of a model retrained in
    place are never reused."""
    h = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.suffix in (".safetensors", ".bin", ".json", ".gguf", ".pt"):
            st = path.stat()
            h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return "local-" + h.hexdigest()[:16]


class HFBackend(LocalTokenizer):
    """Scores with a transformers causal LM held in this process."""

    def __init__(
        self,
        model,
        tokenizer,
        model_id: str,
        revision: str = "main",
        max_sequence_length: int = 2048,
        max_k: int = 64,
        chunk_positions: int = 256,
    ) -> None:
        import torch

        self.torch = torch
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.view = TokenizerIdentity.from_hf(tokenizer, model_id)
        self.device = next(model.parameters()).device
        self.chunk_positions = chunk_positions
        self.max_sequence_length = max_sequence_length
        limit = getattr(model.config, "max_position_embeddings", None) or max_sequence_length
        self.info = BackendInfo(
            model_id=model_id,
            revision=revision,
            architecture=(getattr(model.config, "architectures", None) or [type(model).__name__])[
                0
            ],
            max_sequence_length=min(max_sequence_length, int(limit)),
            max_k=max_k,
            dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
            device=str(self.device),
            backend="hf",
        )

    @classmethod
    def load(
        cls,
        spec: str,
        tokenizer_spec: str | None = None,
        revision: str = "main",
        device: str = "auto",
        dtype: str = "auto",
        **kwargs,
    ) -> HFBackend:
        import torch
        from transformers import AutoModelForCausalLM

        from fuseserve.loading import load_tokenizer

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        source, extra = resolve_model_spec(spec)
        if not extra:
            extra["revision"] = revision
        log.info("loading %s (%s, %s)", spec, device, dtype)
        # typed as nn.Module: transformers wraps PreTrainedModel.to so mypy cannot bind it
        model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(
            source, dtype=getattr(torch, dtype), **extra
        )
        model = model.to(device)
        if tokenizer_spec is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        else:
            tokenizer = load_tokenizer(tokenizer_spec)
        if revision == "main" and Path(source).is_dir():
            revision = local_revision(Path(source))
        return cls(model, tokenizer, spec, revision=revision, **kwargs)

    def score(self, batch: list[TokenizedText], k: int) -> list[TeacherScores]:
        """Score a batch in one padded forward pass. Blocking."""
        torch = self.torch
        if not 1 <= k <= min(self.info.max_k, self.view.vocab_size):
            raise InvalidRequest("k", f"must be in [1, {self.info.max_k}], got {k}")
        lengths = [len(t.ids) for t in batch]
        ids, mask = pad_ids([t.ids for t in batch])
        ids, mask = ids.to(self.device), mask.to(self.device)
        with torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            out = []
            for row, item in enumerate(batch):
                n = lengths[row]
                top_v = torch.empty((n, k), dtype=torch.float32, device=self.device)
                top_i = torch.empty((n, k), dtype=torch.long, device=self.device)
                gold = torch.full((n,), float("nan"), dtype=torch.float32, device=self.device)
                for start in range(0, n, self.chunk_positions):
                    end = min(start + self.chunk_positions, n)
                    logp = torch.log_softmax(logits[row, start:end].float(), dim=-1)
                    values, indices = logp.topk(k, dim=-1)
                    top_v[start:end], top_i[start:end] = values, indices
                    stop = min(end, n - 1)
                    if stop > start:
                        nxt = ids[row, start + 1 : stop + 1]
                        gold[start:stop] = logp[: stop - start].gather(1, nxt[:, None])[:, 0]
                out.append(
                    TeacherScores(
                        token_ids=item.ids.astype(np.int32),
                        offsets=item.offsets.astype(np.int32),
                        topk_ids=top_i.cpu().numpy().astype(np.int32),
                        topk_logprobs=top_v.cpu().numpy(),
                        gold_logprobs=gold.cpu().numpy(),
                        truncated=item.truncated,
                    )
                )
        return out
