"""Remote vLLM backend: score through vLLM's OpenAI-compatible ``/v1/completions``.

Covers tokenising locally (the same tokenizer the vLLM server runs, for character offsets), one
request per sequence with the token ids as the prompt, ``max_tokens=1``, ``prompt_logprobs=k``,
``temperature=1`` (raw log-probs), and parsing ``choices[0].prompt_logprobs``: entry j holds the
distribution that predicted token j, so fuseserve position j-1 takes its top-k (by ``rank``) and
the log-prob of token j as gold. The last position has no prompt entry; its top-k row is left at
-inf (it carries no label, so the aligner never uses it). Guards: k must not exceed the server's
``max_logprobs`` (``--max-k``); every call has a timeout; HTTP errors become EngineUnavailable.

Leaves out: batching (vLLM batches internally; the batcher still bounds the queue).
"""

from __future__ import annotations

import numpy as np

from fuseserve.teacher.backend import BackendInfo, LocalTokenizer, TokenizedText
from fuseserve.teacher.errors import EngineUnavailable, InvalidRequest
from fuseserve.wire.messages import TeacherScores
from fuseserve.wire.tokenizer import TokenizerIdentity


def parse_prompt_logprobs(
    entries: list, ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """vLLM prompt_logprobs -> (topk_ids [m, k], topk_logprobs [m, k], gold [m])."""
    m = len(ids)
    if len(entries) != m:
        raise EngineUnavailable(f"vLLM returned {len(entries)} prompt_logprobs for {m} tokens")
    top_ids = np.zeros((m, k), dtype=np.int32)
    top_lp = np.full((m, k), -np.inf, dtype=np.float32)
    gold = np.full(m, np.nan, dtype=np.float32)
    for j in range(1, m):
        entry = entries[j] or {}
        ranked = sorted(
            ((int(tid), v) for tid, v in entry.items() if v.get("rank", k + 1) <= k),
            key=lambda item: item[1]["rank"],
        )
        for slot, (tid, v) in enumerate(ranked[:k]):
            top_ids[j - 1, slot] = tid
            top_lp[j - 1, slot] = v["logprob"]
        actual = entry.get(str(int(ids[j])))
        if actual is None:
            raise EngineUnavailable(f"vLLM prompt_logprobs lack the prompt token at {j}")
        gold[j - 1] = actual["logprob"]
    return top_ids, top_lp, gold


class VLLMBackend(LocalTokenizer):
    def __init__(
        self,
        base_url: str,
        model_name: str,
        tokenizer,
        max_k: int = 20,
        max_sequence_length: int = 2048,
        timeout_s: float = 120.0,
    ) -> None:
        import httpx

        self.client = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s)
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.view = TokenizerIdentity.from_hf(tokenizer, model_name)
        self.info = BackendInfo(
            model_id=model_name,
            revision="remote",
            architecture="vllm",
            max_sequence_length=max_sequence_length,
            max_k=max_k,
            dtype="remote",
            device=base_url,
            backend="vllm",
        )

    def score(self, batch: list[TokenizedText], k: int) -> list[TeacherScores]:
        import httpx

        if not 1 <= k <= self.info.max_k:
            raise InvalidRequest("k", f"must be in [1, {self.info.max_k}] (server max_logprobs)")
        out = []
        for item in batch:
            body = {
                "model": self.model_name,
                "prompt": item.ids.tolist(),
                "max_tokens": 1,
                "temperature": 1.0,
                "prompt_logprobs": k,
            }
            try:
                response = self.client.post("/v1/completions", json=body)
            except httpx.HTTPError as exc:
                raise EngineUnavailable(f"vLLM at {self.client.base_url}: {exc}") from exc
            if response.status_code != 200:
                raise EngineUnavailable(
                    f"vLLM at {self.client.base_url}: HTTP {response.status_code} "
                    f"{response.text[:200]}"
                )
            entries = response.json()["choices"][0]["prompt_logprobs"]
            top_ids, top_lp, gold = parse_prompt_logprobs(entries, item.ids, k)
            out.append(
                TeacherScores(
                    token_ids=item.ids.astype(np.int32),
                    offsets=item.offsets.astype(np.int32),
                    topk_ids=top_ids,
                    topk_logprobs=top_lp,
                    gold_logprobs=gold,
                    truncated=item.truncated,
                )
            )
        return out
