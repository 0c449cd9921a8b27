"""A streamed answer relayed to the client, and continued on another decode if its decode dies.

The router asks the decode for the token ids of what it streams
(``return_token_ids``; set back to ``null`` before the client sees a chunk,
unless the client asked for them). When the decode fails mid-stream -- its
connection drops, it goes silent, it sends an error event -- the client's
stream stays open and the ladder (:mod:`watchdog_kv.router.ladder`) calls
:meth:`StreamRelay.relay` again on another decode server, or on the restarted
one, which then sends a *continuation*: a completions request whose prompt is
the prompt's token ids followed by the tokens already sent, asking for the
tokens still owed. Its chunks are rewritten into the client's stream (the
stream's id, created and model; chat deltas for a chat request), so the client
reads one answer with nothing missing and nothing twice.

Exactness: with greedy decoding (temperature 0) the continuation computes the
very tokens the dead decode would have. With sampling it draws the rest afresh
(a seeded request does not repeat the undisturbed run's draws), and the
output-based presence and frequency penalties see the sent tokens as prompt.
Text vLLM held back when the decode died (the bytes of an incomplete UTF-8
character) is found by detokenizing the tail of the sent tokens on the new
decode: the continuation restarts after the last token whose text the client
already has. Not found: text held back because it might begin a stop string
(requests with ``stop``); if the decode dies at that moment, that text is
missing from the answer. Requests whose state a continuation cannot carry (n > 1,
echo, logprobs, tools and structured output, several prompts, beam search)
end with a clear error event instead (:func:`not_continuable`).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import aiohttp
from aiohttp import web

from watchdog_kv.router.handoff import (
    Backend,
    HandoffError,
    engine_dead,
    idle_timeout,
    no_answer,
    relay_error,
    retryable,
    several_prompts,
    silent,
)

__all__ = ["ClientGone", "StreamRelay", "not_continuable"]

# Request fields a continuation carries over (sampling and output shaping).
CONTINUED_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "bad_words",
    "allowed_token_ids",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "include_stop_str_in_output",
    "user",
    "priority",
)
_STRUCTURED = (
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
)
_MAX_HELD_TOKENS = 4  # an incomplete UTF-8 character spans at most 4 byte tokens
_TAIL_TOKENS = 6  # decoded to see whether the sent text ends inside a character


class ClientGone(Exception):
    """The client closed its connection; nothing more to send."""


def not_continuable(chat: bool, body: dict[str, Any]) -> str | None:
    """Why a stream of this request could not be continued exactly, or None."""
    if (body.get("n") or 1) > 1 or (body.get("best_of") or 1) > 1:
        return "n > 1"
    if body.get("use_beam_search"):
        return "beam search"
    if body.get("echo"):
        return "echo"
    if body.get("logprobs") not in (None, False) or body.get("prompt_logprobs") is not None:
        return "logprobs"
    if any(body.get(key) not in (None, [], {}) for key in _STRUCTURED):
        return "tools or structured output"
    if not chat and several_prompts("/v1/completions", body) is not None:
        return "several prompts"
    return None


class StreamRelay:
    """One client stream, fed by one decode after another until it is complete."""

    def __init__(self, request: web.Request, path: str, body: dict[str, Any], request_id: str):
        self.request = request
        self.path = path
        self.chat = path.endswith("/chat/completions")
        self.body = body
        self.request_id = request_id
        self.client_ids = bool(body.get("return_token_ids"))
        self.usage_wanted = bool((body.get("stream_options") or {}).get("include_usage"))
        self.why_not = not_continuable(self.chat, body)
        self.response: web.StreamResponse | None = None
        self.headers: dict[str, str] = {}
        self.prompt_ids: list[int] | None = None
        self.emitted: list[int] = []  # token ids the client was sent
        self.text = ""  # the text the client was sent
        self.continuations = 0
        self._head: dict[str, Any] = {}
        self._template: dict[str, Any] | None = None  # a chat chunk of this stream
        self._finished = False

    @property
    def started(self) -> bool:
        """Has the client been sent anything? (Until then a failure is a plain retry.)"""
        return self.response is not None

    async def relay(
        self,
        http: aiohttp.ClientSession,
        backend: Backend,
        params: dict[str, Any] | None,
        idle_s: float,
        headers: dict[str, str] | None = None,
    ) -> web.StreamResponse:
        """Stream from ``backend`` to the client until the answer is complete.

        Raises :class:`HandoffError` when ``backend`` fails (the ladder decides
        what next; :attr:`started` says whether the client has seen anything),
        :class:`ClientGone` when the client left.
        """
        continuing = self.started
        if continuing:
            if self.why_not:
                raise HandoffError(
                    502,
                    f"cannot continue this stream on another decode ({self.why_not})",
                    "decode_failed",
                )
            path, body = "/v1/completions", await self._continuation(http, backend)
            self.continuations += 1
            request_id = f"{self.request_id}-cont{self.continuations}"
        else:
            path, request_id = self.path, self.request_id
            body = {**self.body, "return_token_ids": True}
            if params is not None:
                body["kv_transfer_params"] = params
        try:
            upstream = await http.post(
                f"{backend.url}{path}",
                json=body,
                headers={"X-Request-Id": request_id, **(headers or {})},
                timeout=idle_timeout(idle_s),
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise no_answer("decode", backend, exc, idle_s) from None
        async with upstream:
            if upstream.status != 200:
                raise await relay_error(upstream, backend)
            self.headers.setdefault(
                "Content-Type", upstream.headers.get("Content-Type", "text/event-stream")
            )
            try:
                async for raw in upstream.content:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        return await self._end()
                    if await self._event(json.loads(data), backend, continuing):
                        assert self.response is not None
                        return self.response
            except TimeoutError:
                raise silent("decode", backend, idle_s) from None
            except (aiohttp.ClientError, ValueError) as exc:
                raise _failed_mid_stream(backend, exc or type(exc).__name__) from None
        if self._finished:  # everything came but the closing [DONE]
            return await self._end()
        raise HandoffError(
            502,
            f"decode server {backend.name} ended the stream before it was complete",
            "decode_failed",
            server=backend.name,
        )

    async def fail(self, err: HandoffError) -> web.StreamResponse:
        """End a started stream with an error event (its headers are long gone)."""
        event = {"error": {"message": err.message, "type": err.kind, "code": err.status}}
        await self._write(event)
        return await self._end()

    # -- events ----------------------------------------------------------------------
    async def _event(self, event: dict[str, Any], backend: Backend, continuing: bool) -> bool:
        """Send one upstream event on; True when it ended the stream."""
        if "error" in event and not event.get("choices"):
            error = event["error"] if isinstance(event["error"], dict) else {}
            err = _failed_mid_stream(
                backend, error.get("message") or event["error"], int(error.get("code") or 500)
            )
            if retryable(err):
                raise err
            await self.fail(err)  # the request's own fault: the client is told as vLLM said
            return True
        if not self._head:
            self._head = {k: event.get(k) for k in ("id", "created", "model")}
        if continuing:
            rewritten = self._from_continuation(event)
            if rewritten is not None:
                await self._write(rewritten)
        elif self._record(event):
            await self._write(event)
        return False

    def _record(self, event: dict[str, Any]) -> bool:
        """Note what the client is sent of a first-hand chunk; False: do not send it."""
        if self.chat and self.prompt_ids is None and event.get("prompt_token_ids") is not None:
            self.prompt_ids = list(event["prompt_token_ids"])
        if not self.client_ids and "prompt_token_ids" in event:
            event["prompt_token_ids"] = None
        choices = event.get("choices") or []
        for choice in choices:
            ids = choice.get("token_ids") or []
            self.emitted.extend(ids)
            if not self.chat and self.prompt_ids is None and choice.get("prompt_token_ids"):
                self.prompt_ids = list(choice["prompt_token_ids"])
            if self.chat:
                self.text += (choice.get("delta") or {}).get("content") or ""
            else:
                self.text += choice.get("text") or ""
            if choice.get("finish_reason"):
                self._finished = True
            if not self.client_ids:
                for key in ("token_ids", "prompt_token_ids"):
                    if key in choice:
                        choice[key] = None
        if self.chat and choices:
            self._template = event  # not changed after this; copied only when used
            if not self.client_ids and all(_empty_delta(c) for c in choices):
                return False  # sent by vLLM only because token ids were asked for
        return True

    def _from_continuation(self, event: dict[str, Any]) -> dict[str, Any] | None:
        """A continuation chunk (completions) as a chunk of the client's stream."""
        choices = []
        for choice in event.get("choices") or []:
            ids = list(choice.get("token_ids") or [])
            text = choice.get("text") or ""
            self.emitted.extend(ids)
            self.text += text
            finish = choice.get("finish_reason")
            self._finished = self._finished or bool(finish)
            if self.chat:
                template = (self._template or {}).get("choices", [{}])[0]
                out = {**copy.deepcopy(template), "index": 0, "delta": {"content": text}}
                out.update(logprobs=None, finish_reason=finish)
                if "stop_reason" in choice or "stop_reason" in out:
                    out["stop_reason"] = choice.get("stop_reason")
            else:
                out = {**choice, "index": 0, "prompt_token_ids": None}
            out["token_ids"] = ids if self.client_ids else None
            choices.append(out)
        if self.chat:
            base = copy.deepcopy(self._template) if self._template else {}
            base.pop("prompt_token_ids", None)
            base.pop("usage", None)
            chunk = {**base, **self._head, "object": "chat.completion.chunk", "choices": choices}
        else:
            chunk = {**event, **self._head, "choices": choices}
        if event.get("usage"):
            chunk["usage"] = self._usage()
        elif "usage" in chunk:
            chunk.pop("usage")
        return chunk if choices or "usage" in chunk else None

    def _usage(self) -> dict[str, int]:
        prompt = len(self.prompt_ids or [])
        done = len(self.emitted)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    # -- the continuation request ----------------------------------------------------
    async def _continuation(self, http: aiohttp.ClientSession, backend: Backend) -> dict[str, Any]:
        if self.prompt_ids is None:
            raise HandoffError(
                502, "cannot continue: the prompt's token ids never came", "decode_failed"
            )
        kept = await self._aligned(http, backend)
        self.emitted = self.emitted[:kept]
        body: dict[str, Any] = {k: self.body[k] for k in CONTINUED_FIELDS if k in self.body}
        body.update(
            model=self.body.get("model"),
            prompt=[*self.prompt_ids, *self.emitted],
            stream=True,
            return_token_ids=True,
        )
        most = self.body.get("max_completion_tokens") if self.chat else None
        most = most if most is not None else self.body.get("max_tokens")
        if most is not None:
            body["max_tokens"] = max(1, most - len(self.emitted))
        least = self.body.get("min_tokens")
        if least:
            body["min_tokens"] = max(0, least - len(self.emitted))
        if self.usage_wanted:
            body["stream_options"] = {"include_usage": True}
        return body

    async def _aligned(self, http: aiohttp.ClientSession, backend: Backend) -> int:
        """How many sent tokens the client has the whole text of; the rest are redone.

        vLLM's incremental detokenizer holds text back while the decoded tail ends in
        an incomplete UTF-8 character (U+FFFD) and sends it once a later token
        completes it. So the client has the text of the first ``k`` tokens exactly
        when the tail up to ``k`` decodes cleanly; the largest such ``k`` is where
        the continuation starts (greedy decoding then recomputes the held tokens).
        """
        lowest = max(0, len(self.emitted) - _MAX_HELD_TOKENS)
        for kept in range(len(self.emitted), lowest, -1):
            tail = self.emitted[max(0, kept - _TAIL_TOKENS) : kept]
            text = await _detokenize(http, backend, self.body.get("model"), tail)
            if text is not None and not text.endswith("\ufffd"):
                return kept
        return lowest

    # -- writing -----------------------------------------------------------------------
    async def _write(self, event: dict[str, Any]) -> None:
        data = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
        await self._send(f"data: {data}\n\n".encode())

    async def _send(self, payload: bytes) -> None:
        try:
            if self.response is None:
                self.response = web.StreamResponse(
                    status=200,
                    headers={
                        "Content-Type": "text/event-stream",
                        **self.headers,
                        "Cache-Control": "no-cache",
                        "X-Request-Id": self.request_id,
                    },
                )
                await self.response.prepare(self.request)
            await self.response.write(payload)
        except ConnectionResetError:
            raise ClientGone from None

    async def _end(self) -> web.StreamResponse:
        await self._send(b"data: [DONE]\n\n")
        assert self.response is not None
        try:
            await self.response.write_eof()
        except ConnectionResetError:
            raise ClientGone from None
        return self.response


def _failed_mid_stream(backend: Backend, detail: object, status: int = 502) -> HandoffError:
    return HandoffError(
        status,
        f"decode server {backend.name} failed mid-stream: {detail}",
        "engine_dead" if engine_dead(status, detail) else "decode_failed",
        server=backend.name,
    )


def _empty_delta(choice: dict[str, Any]) -> bool:
    """vLLM's chunk for a token with no text *only* because token ids were asked for
    (without them it skips the token; a token that has a delta says ``"content": ""``)."""
    return (
        choice.get("delta") == {}
        and choice.get("finish_reason") is None
        and choice.get("logprobs") is None
    )


async def _detokenize(
    http: aiohttp.ClientSession, backend: Backend, model: Any, ids: list[int]
) -> str | None:
    """The text of ``ids`` by ``backend``'s tokenizer; a server that cannot say is failing."""
    try:
        async with http.post(
            f"{backend.url}/detokenize",
            json={"model": model, "tokens": ids},
            timeout=aiohttp.ClientTimeout(total=30),
        ) as resp:
            if resp.status != 200:
                raise await relay_error(resp, backend)
            data = await resp.json()
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise no_answer("decode", backend, exc, 30) from None
    return data.get("prompt") if isinstance(data, dict) else None
