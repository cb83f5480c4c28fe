"""Remote TGI backend: score through text-generation-inference with huggingface_hub's client.

Covers sending each text (``TokenizedText.text``) to TGI's generate route through
``AsyncInferenceClient.text_generation(details=True, decoder_input_details=True,
max_new_tokens=1)``, all sequences of a batch concurrently, and reading ``details.prefill``:
entry j holds token j and log p(token j | tokens < j). TGI gives no alternatives for prompt
tokens, so this backend serves k = 1 only and its single "top" entry at position i is the actual
next token with its log-prob (equal to the gold log-prob), not the argmax. The last position has
no next token; its row is -inf (no label, never used).

TGI tokenises on the server; the local tokenizer (the same one) supplies character offsets. The
served ids are TGI's: a BOS that TGI adds is kept (offsets (0, 0)); any other difference from the
local ids means the tokenizers differ and fails loudly (EngineUnavailable).

Leaves out: batching (TGI batches internally; the batcher still bounds the queue).
"""

from __future__ import annotations

import asyncio

import numpy as np

from fuseserve.teacher.backend import BackendInfo, LocalTokenizer, TokenizedText
from fuseserve.teacher.errors import EngineUnavailable, InvalidRequest
from fuseserve.wire.messages import TeacherScores
from fuseserve.wire.tokenizer import TokenizerIdentity

TGI_K_MESSAGE = (
    "the tgi backend serves k = 1 only: TGI returns just the prompt tokens' own log-probs, "
    "no top-k alternatives (use the vllm or hf backend for k > 1)"
)


def parse_prefill(prefill: list, local: TokenizedText) -> TeacherScores:
    """TGI ``details.prefill`` [{id, logprob, ...}] + local offsets -> k = 1 TeacherScores."""
    remote_ids = np.asarray([int(_field(t, "id")) for t in prefill], dtype=np.int64)
    ids, offsets = local.ids, local.offsets
    if len(remote_ids) == len(ids) + 1 and np.array_equal(remote_ids[1:], ids):
        ids = remote_ids
        offsets = np.concatenate([np.zeros((1, 2), dtype=offsets.dtype), offsets])
    elif len(remote_ids) == len(ids) - 1 and np.array_equal(remote_ids, ids[1:]):
        raise EngineUnavailable(
            "TGI did not add the BOS token the local tokenizer adds; set add_bos to false"
        )
    elif not np.array_equal(remote_ids, ids):
        raise EngineUnavailable(
            "TGI tokenised the text differently from the local tokenizer "
            f"({len(remote_ids)} vs {len(ids)} tokens): pass --tokenizer with TGI's tokenizer"
        )
    m = len(ids)
    gold = np.full(m, np.nan, dtype=np.float32)
    for j in range(1, m):
        value = _field(prefill[j], "logprob")
        if value is None:
            raise EngineUnavailable(f"TGI returned no log-prob for prompt token {j}")
        gold[j - 1] = value
    top_ids = np.zeros((m, 1), dtype=np.int32)
    top_ids[:-1, 0] = ids[1:]
    top_lp = np.full((m, 1), -np.inf, dtype=np.float32)
    top_lp[:-1, 0] = gold[:-1]
    return TeacherScores(
        token_ids=ids.astype(np.int32),
        offsets=offsets.astype(np.int32),
        topk_ids=top_ids,
        topk_logprobs=top_lp,
        gold_logprobs=gold,
        truncated=local.truncated,
    )


def _field(item, name: str):
    return item[name] if isinstance(item, dict) else getattr(item, name)


class TGIBackend(LocalTokenizer):
    def __init__(
        self,
        base_url: str,
        model_name: str,
        tokenizer,
        max_sequence_length: int = 2048,
        timeout_s: float = 120.0,
        token: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.token = token
        self.tokenizer = tokenizer
        self.view = TokenizerIdentity.from_hf(tokenizer, model_name)
        self.info = BackendInfo(
            model_id=model_name,
            revision="remote",
            architecture="tgi",
            max_sequence_length=max_sequence_length,
            max_k=1,
            dtype="remote",
            device=base_url,
            backend="tgi",
        )

    def score(self, batch: list[TokenizedText], k: int) -> list[TeacherScores]:
        if k != 1:
            raise InvalidRequest("k", TGI_K_MESSAGE)
        return asyncio.run(self._score_all(batch))

    async def _score_all(self, batch: list[TokenizedText]) -> list[TeacherScores]:
        from huggingface_hub import AsyncInferenceClient

        client = AsyncInferenceClient(model=self.base_url, timeout=self.timeout_s, token=self.token)
        try:
            outputs = await asyncio.gather(*(self._score_one(client, item) for item in batch))
        finally:
            await client.close()
        return list(outputs)

    async def _score_one(self, client, item: TokenizedText) -> TeacherScores:
        if not item.text:
            raise InvalidRequest("texts", "the tgi backend needs the text of each sequence")
        try:
            output = await client.text_generation(
                item.text,
                details=True,
                decoder_input_details=True,
                max_new_tokens=1,
            )
        except Exception as exc:  # the hub client raises many types: all mean "TGI failed"
            raise EngineUnavailable(f"TGI at {self.base_url}: {type(exc).__name__}: {exc}") from exc
        prefill = getattr(getattr(output, "details", None), "prefill", None)
        if not prefill:
            raise EngineUnavailable(
                f"TGI at {self.base_url} returned no prefill details "
                "(is it a text-generation-inference server?)"
            )
        return parse_prefill(prefill, item)
