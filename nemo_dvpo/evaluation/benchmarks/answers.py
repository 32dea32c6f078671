"""Where answers come from: a loaded policy (Megatron inference at any TP/PP/DP, or the vLLM engine it was
refitted into) or any OpenAI-compatible server.

Both answer a list of chats with one set of sampling settings and return one :class:`Answer` per chat.
:class:`PolicyAnswerer` is collective: every rank calls it with the same chats; each data-parallel
replica answers its share in batches and rank 0 gets all answers.
"""

from __future__ import annotations

import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Optional

from nemo_dvpo.utils.errors import NemoDvpoError


@dataclass(frozen=True)
class Sampling:
    """One benchmark's generation settings for a request; ``temperature == 0`` is greedy."""

    temperature: float
    max_new_tokens: int
    top_p: float = 1.0


@dataclass
class Answer:
    text: str
    finish_reason: str  # "stop", "length", or "error" (the prompt did not fit; text is empty)
    completion_tokens: int
    error: Optional[str] = None


def batch_seed(base_seed: int, ids: list) -> int:
    """A sampling seed fixed by the batch's question ids: a resumed run redraws a batch the same way."""
    return (base_seed + zlib.crc32("|".join(map(str, ids)).encode())) % 2**31


class PolicyAnswerer:
    """Answers with :func:`nemo_dvpo.inference.completion.complete` on a loaded :class:`Policy` (drawn by its
    Megatron model, or by its vLLM engine: ``Policy.engine``)."""

    def __init__(self, policy, batch_size: int, data_parallel, seed: int = 0):
        self.policy, self.batch_size, self.data_parallel, self.seed = policy, batch_size, data_parallel, seed
        self.source = f"{'vllm' if policy.engine is not None else 'megatron'}:{policy.name}"

    @property
    def round_size(self) -> int:
        """Chats per call that keep every replica busy with one batch."""
        return self.batch_size * self.data_parallel.size

    def broadcast(self, payload: Any) -> Any:
        """Rank 0's ``payload`` on every rank (the pending work is decided on rank 0)."""
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return payload
        box = [payload]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def answer(self, chats: list[list[dict]], sampling: Sampling, ids: list) -> list[Answer]:
        from nemo_dvpo.inference.chat import apply_chat_template
        from nemo_dvpo.inference.completion import CompletionRequest, complete, room_for_reply
        from nemo_dvpo.inference.generation import SamplingConfig

        mine = list(range(self.data_parallel.rank, len(chats), self.data_parallel.size))
        answers: dict[int, Answer] = {}
        for start in range(0, len(mine), self.batch_size):
            batch = mine[start:start + self.batch_size]
            prompts = {index: apply_chat_template(self.policy.tokenizer, chats[index]) for index in batch}
            fits = [index for index in batch if room_for_reply(len(prompts[index]), self.policy.max_length) >= 1]
            for index in set(batch) - set(fits):
                answers[index] = Answer("", "error", 0, f"the prompt has {len(prompts[index])} tokens; the model "
                                                        f"takes {self.policy.max_length}")
            if not fits:
                continue
            config = SamplingConfig(temperature=sampling.temperature, top_p=sampling.top_p,
                                    greedy=sampling.temperature == 0, max_new_tokens=sampling.max_new_tokens,
                                    seed=batch_seed(self.seed, [ids[index] for index in fits]))
            requests = [CompletionRequest(prompts[index], sampling.max_new_tokens) for index in fits]
            for index, completion in zip(fits, complete(self.policy, requests, config)):
                answers[index] = Answer(completion.text, completion.finish_reason, completion.completion_tokens)
        gathered = {index: answer for part in self.data_parallel.gather_objects(answers)
                    for index, answer in part.items()}
        return [gathered[index] for index in range(len(chats))]

    def describe(self, sampling: Sampling) -> dict:
        return {"source": self.source, **asdict(sampling), "chat_template": True}


class HTTPAnswerer:
    """Answers from an OpenAI-compatible server (``/v1/chat/completions``), ``concurrency`` requests at a time."""

    def __init__(self, base_url: str, model: Optional[str], api_key: str, concurrency: int, timeout_s: float,
                 max_retries: int, seed: int = 0):
        import openai

        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "no-key", timeout=timeout_s,
                                    max_retries=max_retries)
        if model is None:
            try:
                models = [entry.id for entry in self.client.models.list()]
            except openai.OpenAIError as error:
                raise NemoDvpoError(f"--answers-from {base_url}: cannot list its models ({error})") from None
            if len(models) != 1:
                raise NemoDvpoError(f"--answers-from {base_url} serves {len(models)} models ({', '.join(models)}); "
                                    "name one with --answers-model")
            model = models[0]
        self.model, self.base_url, self.concurrency, self.seed = model, base_url, concurrency, seed
        self.source = f"http:{base_url} model={model}"
        self.round_size = 4 * concurrency

    def broadcast(self, payload: Any) -> Any:
        return payload

    def _one(self, chat: list[dict], sampling: Sampling, seed: int) -> Answer:
        import openai

        try:
            response = self.client.chat.completions.create(
                model=self.model, messages=chat, temperature=sampling.temperature, top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens, seed=seed)
        except openai.BadRequestError as error:  # e.g. the prompt is over the server's context length
            return Answer("", "error", 0, f"HTTP 400: {error}")
        except openai.OpenAIError as error:
            raise NemoDvpoError(f"--answers-from {self.base_url} failed: {type(error).__name__}: {error}") from None
        choice = response.choices[0]
        usage = getattr(response, "usage", None)
        return Answer(choice.message.content or "", choice.finish_reason or "stop",
                      getattr(usage, "completion_tokens", 0) or 0)

    def answer(self, chats: list[list[dict]], sampling: Sampling, ids: list) -> list[Answer]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = [pool.submit(self._one, chat, sampling, batch_seed(self.seed, [record_id]))
                       for chat, record_id in zip(chats, ids)]
            return [future.result() for future in futures]

    def describe(self, sampling: Sampling) -> dict:
        return {"source": self.source, **asdict(sampling)}
