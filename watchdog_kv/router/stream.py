"""One answer relayed from a decode, and continued on another decode if its decode dies.

Every request that can be continued exactly is *streamed* from the decode, whether
the client asked for a stream or not: the router sees each token as it comes, so
its decode timeout is progress-based (``WATCHDOG_KV_DECODE_IDLE_TIMEOUT`` of
silence, however long the answer), and it knows what was generated when a decode
dies. A streamed client gets the chunks as they come; a client that asked for a
whole answer gets it assembled from them, shaped as vLLM's own.

The router asks the decode for the token ids of what it streams
(``return_token_ids``; set back to ``null`` before the client sees a chunk,
unless the client asked for them). When the decode fails mid-answer -- its
connection drops, it goes silent, it sends an error event -- the ladder
(:mod:`watchdog_kv.router.ladder`) calls :meth:`StreamRelay.relay` again on
another decode server, or on the restarted one, which then computes a
*continuation*: a completions request whose prompt is the prompt's token ids
followed by the tokens already generated, asking for the tokens still owed. Its
chunks are rewritten into the client's answer (the stream's id, created and
model; chat deltas for a chat request), so the client reads one answer with
nothing missing and nothing twice, ending as the undisturbed one would:

- **Budget.** The continuation may generate what the request had left: the
  client's ``max_tokens`` (``max_completion_tokens``) minus the tokens sent, or
  for a completions request without it vLLM's default of 16 minus them; for a
  chat request without it, the context left (the decode's ``max_model_len``
  minus prompt minus sent), as vLLM computed it. Finish reason and
  usage are the undisturbed ones (usage counts the prompt and every token sent).
- **Held-back text.** vLLM holds text back while it ends inside a UTF-8 character
  and, for requests with ``stop`` strings, while it could begin one. The first
  kind is redone (the continuation restarts after the last token whose text the
  client has: :meth:`StreamRelay._aligned`); the second is recovered from the
  sent tokens' text (``/detokenize``) and passed on before the continuation's.
- **Stop strings across the break.** A continuation's vLLM matches stop strings
  in its own text only, so the router matches them in the text around the break
  itself, holding back what could begin one, as vLLM does; a match ends the
  answer there (``finish_reason: stop``, ``stop_reason``: the string) and the
  continuation is dropped.
- **Nothing after the end.** A decode that fails after its finish chunk has
  nothing left to give: the answer is closed (usage, ``[DONE]``), not continued.
- **Sampling.** Greedy decoding recomputes the very tokens. A ``seed`` is
  replayed: the continuation names the random draws already spent
  (``vllm_xargs.watchdog_kv_draws``) and the plugin in the decode advances the
  request's generator past them before its first sample
  (:mod:`watchdog_kv.seeds`), so it draws what the dead decode would have.
  Without a seed, the rest is drawn afresh: a sample from the same distribution
  as an undisturbed answer, which is all such a request asks for.

What a continuation cannot carry (:func:`not_continuable`): n > 1, beam search,
echo, logprobs of any count, tools and structured output, several prompts in one
request, presence/frequency penalties (they count generated tokens, which a
continuation sees as prompt), repetition detection and thinking budgets, and a
seed when the decodes run without the plugin. Such a stream ends with a clear
error event when its decode dies; such a non-streamed request is relayed whole
(no progress to watch: its timeout is the request budget) and redone from the
start on another decode. The table is in docs/supervisor.md.
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
from watchdog_kv.wire import DRAWS as DRAWS_ARG

__all__ = [
    "COMPLETIONS_MAX_TOKENS",
    "DRAWS_ARG",
    "ClientGone",
    "StreamRelay",
    "not_continuable",
    "stop_strings",
]

COMPLETIONS_MAX_TOKENS = 16  # vLLM's default max_tokens for /v1/completions

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
# Fields whose effect depends on what was *generated* so far (a continuation sees it
# as prompt), when set to anything but their neutral value.
_OUTPUT_DEPENDENT = {
    "presence_penalty": "presence or frequency penalty",
    "frequency_penalty": "presence or frequency penalty",
    "repetition_detection": "repetition detection",
    "thinking_token_budget": "a thinking token budget",
    "watermarking": "watermarking",
}
_MAX_HELD_TOKENS = 4  # an incomplete UTF-8 character spans at most 4 byte tokens
_TAIL_TOKENS = 6  # decoded to see whether the sent text ends inside a character


class ClientGone(Exception):
    """The client closed its connection; nothing more to send."""


def stop_strings(body: dict[str, Any]) -> list[str]:
    """The request's stop strings, as vLLM reads ``stop`` (a string or a list)."""
    stop = body.get("stop")
    if isinstance(stop, str):
        return [stop] if stop else []
    if isinstance(stop, list):
        return [s for s in stop if isinstance(s, str) and s]
    return []


def _sampled(body: dict[str, Any]) -> bool:
    temperature = body.get("temperature")
    return temperature is None or temperature > 0


def not_continuable(chat: bool, body: dict[str, Any], seeds_replayed: bool = True) -> str | None:
    """Why an answer to this request could not be continued exactly, or None."""
    if (body.get("n") or 1) > 1 or (body.get("best_of") or 1) > 1:
        return "n > 1"
    if body.get("use_beam_search"):
        return "beam search"
    if body.get("echo"):
        return "echo"
    logprobs = body.get("logprobs")
    if (logprobs is not None and logprobs is not False) or any(
        body.get(key) is not None for key in ("prompt_logprobs", "logprob_token_ids")
    ):
        return "logprobs"
    if any(body.get(key) not in (None, [], {}) for key in _STRUCTURED):
        return "tools or structured output"
    if not chat and several_prompts("/v1/completions", body) is not None:
        return "several prompts"
    if body.get("prompt_embeds") is not None or (chat and _multimodal(body)):
        return "non-text input (a continuation carries token ids only)"
    for key, why in _OUTPUT_DEPENDENT.items():
        if body.get(key) not in (None, 0, 0.0, False, {}):
            return why
    if body.get("seed") is not None and _sampled(body) and not seeds_replayed:
        return "a seed, with decodes that run without the plugin (it replays the draws)"
    return None


def _multimodal(body: dict[str, Any]) -> bool:
    """Does a chat request carry content parts other than text (images, audio...)?"""
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(
            not (isinstance(part, dict) and part.get("type") in ("text", "input_text"))
            for part in content
        ):
            return True
    return False


class StreamRelay:
    """One answer, fed by one decode after another until it is complete.

    ``whole``: the client asked for one JSON answer (``stream`` false); it is
    assembled from the decode's stream and sent at the end.
    """

    def __init__(
        self,
        request: web.Request,
        path: str,
        body: dict[str, Any],
        request_id: str,
        seeds_replayed: bool = True,
    ):
        self.request = request
        self.path = path
        self.chat = path.endswith("/chat/completions")
        self.body = body
        self.request_id = request_id
        self.whole = not body.get("stream")
        self.client_ids = bool(body.get("return_token_ids"))
        options = body.get("stream_options")
        self.usage_wanted = self.whole or (
            isinstance(options, dict) and bool(options.get("include_usage"))
        )
        self.why_not = not_continuable(self.chat, body, seeds_replayed)
        self.response: web.StreamResponse | None = None  # the client's, once it is begun
        self.headers: dict[str, str] = {}
        self.prompt_ids: list[int] | None = None
        self.emitted: list[int] = []  # token ids generated for the client
        self.text = ""  # their text, as the client was sent it (or will be, whole)
        self.finish: str | None = None
        self.stop_reason: Any = None
        self.continuations = 0
        self._stops = stop_strings(body)
        self._include_stop = bool(body.get("include_stop_str_in_output"))
        self._min_tokens = int(body.get("min_tokens") or 0)
        self._pending = ""  # text of generated tokens not passed on yet (continuations)
        self._min_offset = 0  # where stop strings start to count, in the answer's text
        self._head: dict[str, Any] = {}
        self._template: dict[str, Any] | None = None  # a chat chunk of this stream
        self._extra: dict[str, str] = {}  # whole chat: other text fields of the deltas
        self._usage_seen: dict[str, Any] | None = None  # the first decode's own usage
        self._usage_sent = False
        self._finish_sent = False

    @property
    def started(self) -> bool:
        """Is there progress to continue from? (Until then a failure is a plain retry.)"""
        return bool(self.emitted or self.text or self._extra) or self.response is not None

    @property
    def committed(self) -> bool:
        """Has the client been sent anything? (Then an error can only be an event.)"""
        return self.response is not None

    async def relay(
        self,
        http: aiohttp.ClientSession,
        backend: Backend,
        params: dict[str, Any] | None,
        idle_s: float,
        headers: dict[str, str] | None = None,
    ) -> web.StreamResponse:
        """Stream from ``backend`` until the answer is complete; return the client's response.

        Raises :class:`HandoffError` when ``backend`` fails (the ladder decides
        what next; :attr:`started` says whether there is something to continue),
        :class:`ClientGone` when the client left.
        """
        if self.finish is not None:  # the decode failed after the end: nothing is owed
            return await self._close()
        continuing = self.started
        if continuing:
            if self.why_not:
                raise HandoffError(
                    502,
                    f"cannot continue this answer on another decode ({self.why_not})",
                    "decode_failed",
                )
            cont = await self._continuation(http, backend)
            if cont is None:  # its budget is spent: it ended at its length
                return await self._close()
            path, body = "/v1/completions", cont
            self.continuations += 1
            request_id = f"{self.request_id}-cont{self.continuations}"
        else:
            path, request_id = self.path, self.request_id
            body = {**self.body, "stream": True, "return_token_ids": True}
            if self.whole:
                body["stream_options"] = {"include_usage": True}
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
                        return await self._close()
                    event = json.loads(data)
                    if "error" in event and not event.get("choices"):
                        return await self._upstream_error(event, backend)
                    if not self._head:
                        self._head = {k: event.get(k) for k in ("id", "created", "model")}
                    if continuing:
                        if await self._continued(event):
                            upstream.close()  # a stop string across the break: the rest
                            return await self._close()  # is not wanted (vLLM aborts it)
                    else:
                        await self._first_hand(event)
            except TimeoutError:
                raise silent("decode", backend, idle_s) from None
            except (aiohttp.ClientError, ValueError) as exc:
                raise _failed_mid_stream(backend, exc or type(exc).__name__) from None
        if self.finish is not None:  # everything came but the closing [DONE]
            return await self._close()
        raise HandoffError(
            502,
            f"decode server {backend.name} ended the stream before it was complete",
            "decode_failed",
            server=backend.name,
        )

    async def fail(self, err: HandoffError) -> web.StreamResponse:
        """End a begun stream with an error event (its headers are long gone)."""
        event = {"error": {"message": err.message, "type": err.kind, "code": err.status}}
        await self._write(event)
        return await self._end()

    async def _upstream_error(self, event: dict[str, Any], backend: Backend) -> web.StreamResponse:
        error = event["error"] if isinstance(event["error"], dict) else {}
        err = _failed_mid_stream(
            backend, error.get("message") or event["error"], int(error.get("code") or 500)
        )
        if retryable(err) or not self.committed:
            raise err  # another decode may answer; or the client is told as vLLM said
        return await self.fail(err)

    # -- the first decode's events -------------------------------------------------------
    async def _first_hand(self, event: dict[str, Any]) -> None:
        if event.get("usage") and not event.get("choices"):
            self._usage_seen = event["usage"]
            self._usage_sent = not self.whole
        if self._record(event) and not self.whole:
            await self._write(event)

    def _record(self, event: dict[str, Any]) -> bool:
        """Note what a first-hand chunk gives the client; False: do not send it on."""
        if self.chat and self.prompt_ids is None and event.get("prompt_token_ids") is not None:
            self.prompt_ids = list(event["prompt_token_ids"])
        if not self.client_ids and "prompt_token_ids" in event:
            event["prompt_token_ids"] = None
        choices = event.get("choices") or []
        for choice in choices:
            ids = choice.get("token_ids") or []
            self.emitted.extend(ids)
            self._note_uncontinuable(choice, ids)
            if not self.chat and self.prompt_ids is None and choice.get("prompt_token_ids"):
                self.prompt_ids = list(choice["prompt_token_ids"])
            if self.chat:
                delta = choice.get("delta") or {}
                self.text += delta.get("content") or ""
                for key, value in delta.items():
                    if key not in ("role", "content") and isinstance(value, str):
                        self._extra[key] = self._extra.get(key, "") + value
            else:
                self.text += choice.get("text") or ""
            if choice.get("finish_reason"):
                self.finish, self.stop_reason = choice["finish_reason"], choice.get("stop_reason")
                self._finish_sent = not self.whole
            if not self.client_ids:
                for key in ("token_ids", "prompt_token_ids"):
                    if key in choice:
                        choice[key] = None
        if self.chat and choices:
            self._template = event  # not changed after this; copied only when used
            if not self.client_ids and all(_empty_delta(c) for c in choices):
                return False  # sent by vLLM only because token ids were asked for
        return True

    def _note_uncontinuable(self, choice: dict[str, Any], ids: list[int]) -> None:
        """What the decode sends can make an answer uncontinuable, whatever the request
        said: a reasoning or tool parser's output (its state is not carried), or text
        whose token ids were not sent (vLLM hides them with some parser settings)."""
        if self.why_not:
            return
        delta = choice.get("delta") or {}
        if self.chat and (
            delta.get("tool_calls")
            or any(
                isinstance(v, str) and v for k, v in delta.items() if k not in ("role", "content")
            )
        ):
            self.why_not = "reasoning or tool-call output (its parser's state is not carried)"
        elif not ids and (choice.get("text") or delta.get("content")):
            self.why_not = "the decode sent text without its token ids"

    # -- a continuation's events -----------------------------------------------------------
    async def _continued(self, event: dict[str, Any]) -> bool:
        """Take one continuation chunk; True when a stop string ended the answer here."""
        stopped = False
        out: list[dict[str, Any]] = []
        for choice in event.get("choices") or []:
            ids = list(choice.get("token_ids") or [])
            before = len(self.emitted)
            self.emitted.extend(ids)
            text, finish, reason = self._through_stops(
                choice.get("text") or "", before, choice.get("finish_reason"), choice
            )
            stopped = stopped or (finish == "stop" and not choice.get("finish_reason"))
            self.text += text
            if finish:
                self.finish, self.stop_reason = finish, reason
            if not self.whole and (text or finish or self.client_ids):
                out.append(self._client_choice(choice, text, ids, finish, reason))
        if out:
            self._finish_sent = self._finish_sent or any(c["finish_reason"] for c in out)
            await self._write(self._chunk(out))
        return stopped

    def _through_stops(
        self, text: str, before: int, finish: str | None, choice: dict[str, Any]
    ) -> tuple[str, str | None, Any]:
        """The part of ``text`` the client may have now, matching stop strings across
        the break as vLLM matches them within one answer (the earliest to complete
        wins; none before ``min_tokens``; text that could begin one is held back)."""
        reason = choice.get("stop_reason")
        if not self._stops:
            return text, finish, reason
        buf = self._pending + text
        longest = max(len(s) for s in self._stops)
        after = len(self.emitted)
        if before < self._min_tokens <= after:  # where text starts to count (vLLM's rule)
            known = len(self.text) + len(self._pending)
            self._min_offset = known + len(text) if after == self._min_tokens else known
        if after > self._min_tokens:
            tail = self.text[-(longest - 1) :] if longest > 1 else ""
            window = tail + buf
            floor = max(len(tail), self._min_offset - (len(self.text) - len(tail)))
            best: tuple[int, int, str] | None = None
            for s in self._stops:  # a match must end after the floor
                at = window.find(s, max(0, floor - len(s) + 1))
                if at != -1 and (best is None or at + len(s) < best[1]):
                    best = (at, at + len(s), s)
            if best is not None:
                cut = best[1] if self._include_stop else best[0]
                self._pending = ""
                return buf[: max(0, cut - len(tail))], "stop", best[2]
        if finish or self._include_stop:
            self._pending = ""
            return buf, finish, reason
        hold = longest - 1
        keep = max(0, len(buf) - hold)
        self._pending = buf[keep:]
        return buf[:keep], finish, reason

    def _client_choice(
        self, choice: dict[str, Any], text: str, ids: list[int], finish: str | None, reason: Any
    ) -> dict[str, Any]:
        if self.chat:
            template = (self._template or {}).get("choices", [{}])[0]
            out = {**copy.deepcopy(template), "index": 0, "delta": {"content": text}}
            out.update(logprobs=None, finish_reason=finish)
            if "stop_reason" in choice or "stop_reason" in out:
                out["stop_reason"] = reason
        else:
            out = {**choice, "index": 0, "text": text, "prompt_token_ids": None}
            out.update(finish_reason=finish, stop_reason=reason)
        out["token_ids"] = ids if self.client_ids else None
        return out

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        """A chunk of the client's stream (its id, created, model and object)."""
        if self.chat:
            base = copy.deepcopy(self._template) if self._template else {}
            base.pop("prompt_token_ids", None)
            base.pop("usage", None)
            return {**base, **self._head, "object": "chat.completion.chunk", "choices": choices}
        return {**self._head, "object": "text_completion", "choices": choices}

    def _usage(self) -> dict[str, Any]:
        """The undisturbed answer's usage: vLLM's own, or counted over the continuations."""
        prompt = len(self.prompt_ids or [])
        done = len(self.emitted)
        counted = {
            "prompt_tokens": prompt,
            "completion_tokens": done,
            "total_tokens": prompt + done,
        }
        if self.continuations == 0 and self._usage_seen:
            return dict(self._usage_seen)
        return {**(self._usage_seen or {}), **counted}

    # -- the continuation request ----------------------------------------------------
    def _budget(self) -> int | None:
        """Tokens the request may generate in all; None: what the context allows."""
        if self.chat:
            most = self.body.get("max_completion_tokens")
            return most if most is not None else self.body.get("max_tokens")
        most = self.body.get("max_tokens")  # vLLM reads null as its default too
        return most if isinstance(most, int) else COMPLETIONS_MAX_TOKENS

    async def _continuation(
        self, http: aiohttp.ClientSession, backend: Backend
    ) -> dict[str, Any] | None:
        """The request that computes the rest on ``backend``; None if nothing is owed."""
        if self.prompt_ids is None:
            raise HandoffError(
                502, "cannot continue: the prompt's token ids never came", "decode_failed"
            )
        kept = await self._aligned(http, backend)
        self.emitted = self.emitted[:kept]
        if self._stops:
            if not self._include_stop:
                self._pending = await self._held_back(http, backend)
            if 0 < self._min_tokens <= len(self.emitted):  # stop strings count after it
                self._min_offset = len(
                    await self._text_of(http, backend, self.emitted[: self._min_tokens])
                )
        body: dict[str, Any] = {k: self.body[k] for k in CONTINUED_FIELDS if k in self.body}
        body.update(
            model=self.body.get("model"),
            prompt=[*self.prompt_ids, *self.emitted],
            stream=True,
            return_token_ids=True,
        )
        if self._stops:
            # its text whole and uncut, token by token: the router matches the stop
            # strings (across the break too), holds back and cuts as vLLM would
            body["include_stop_str_in_output"] = True
        budget = self._budget()
        if budget is None:  # what the context allows, as vLLM computed it for the request
            budget = await _max_model_len(http, backend, self.body.get("model"))
            budget -= len(self.prompt_ids)
        if budget - len(self.emitted) <= 0:
            self.finish, self.stop_reason = "length", None
            return None
        body["max_tokens"] = budget - len(self.emitted)
        least = self._min_tokens
        if least:
            body["min_tokens"] = max(0, least - len(self.emitted))
        if self.body.get("seed") is not None:
            xargs = self.body.get("vllm_xargs")
            body["vllm_xargs"] = {
                **(xargs if isinstance(xargs, dict) else {}),
                DRAWS_ARG: len(self.emitted),
            }
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

    async def _held_back(self, http: aiohttp.ClientSession, backend: Backend) -> str:
        """The text of the kept tokens that the client has not been given: what vLLM
        held back because it could begin a stop string."""
        if not self.emitted:
            return ""
        full = await self._text_of(http, backend, self.emitted)
        if not full.startswith(self.text):
            raise HandoffError(
                502,
                "cannot continue exactly: the text of the tokens sent does not begin with "
                "the text the client was sent, so the text held back for a stop string "
                "cannot be recovered",
                "decode_failed",
            )
        return full[len(self.text) :]

    async def _text_of(self, http: aiohttp.ClientSession, backend: Backend, ids: list[int]) -> str:
        """The text of generated tokens ``ids`` as they read after the prompt (a
        tokenizer may drop a leading space of text decoded on its own)."""
        model = self.body.get("model")
        context = (self.prompt_ids or [])[-_TAIL_TOKENS:]
        head = await _detokenize(http, backend, model, context) if context else ""
        full = await _detokenize(http, backend, model, [*context, *ids])
        if head is not None and full is not None and full.startswith(head):
            return full[len(head) :]
        alone = await _detokenize(http, backend, model, ids)
        return alone or ""

    # -- the client's end ---------------------------------------------------------------
    async def _close(self) -> web.StreamResponse:
        """Complete the client's answer: the last text and finish, usage, the end."""
        if self.whole:
            self.text += self._pending
            self._pending = ""
            response = web.json_response(self._assembled())
            response.headers.update({k: v for k, v in self.headers.items() if k.startswith("X-")})
            return response
        if self._pending or (self.finish and not self._finish_sent):
            choice = {"index": 0, "text": "", "finish_reason": None, "stop_reason": None}
            last = self._client_choice(choice, self._pending, [], self.finish, self.stop_reason)
            self.text += self._pending
            self._pending = ""
            self._finish_sent = True
            await self._write(self._chunk([last]))
        if self.usage_wanted and not self._usage_sent:
            self._usage_sent = True
            await self._write({**self._chunk([]), "usage": self._usage()})
        return await self._end()

    def _assembled(self) -> dict[str, Any]:
        """The whole answer, shaped as vLLM 0.32 shapes a non-streamed one."""
        head = {
            "id": self._head.get("id") or self.request_id,
            "created": self._head.get("created"),
            "model": self._head.get("model") or self.body.get("model"),
        }
        ids = self.emitted if self.client_ids else None
        prompt_ids = self.prompt_ids if self.client_ids else None
        usage = {"prompt_tokens_details": None, "completion_tokens_details": None}
        usage.update(self._usage())  # a whole answer's usage names the details, if null
        tail = {"service_tier": None, "system_fingerprint": None, "usage": usage}
        if self.chat:
            message: dict[str, Any] = {
                "role": "assistant",
                "content": self.text,
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
                "reasoning": None,
                **self._extra,
            }
            choice = {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": self.finish,
                "stop_reason": self.stop_reason,
                "token_ids": ids,
                "routed_experts": None,
            }
            return {
                **head,
                "object": "chat.completion",
                "choices": [choice],
                **tail,
                "prompt_logprobs": None,
                "prompt_token_ids": prompt_ids,
                "prompt_text": None,
                "kv_transfer_params": None,
                "ec_transfer_params": None,
                "metrics": None,
            }
        choice = {
            "index": 0,
            "text": self.text,
            "logprobs": None,
            "finish_reason": self.finish,
            "stop_reason": self.stop_reason,
            "token_ids": ids,
            "prompt_logprobs": None,
            "prompt_token_ids": prompt_ids,
            "routed_experts": None,
        }
        return {
            **head,
            "object": "text_completion",
            "choices": [choice],
            **tail,
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "metrics": None,
        }

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


async def _ask(
    http: aiohttp.ClientSession, backend: Backend, path: str, body: dict[str, Any] | None = None
) -> Any:
    """A small JSON call to ``backend`` (GET, or POST with ``body``); a server that
    cannot answer it within 30 s is failing."""
    try:
        async with http.request(
            "GET" if body is None else "POST",
            f"{backend.url}{path}",
            json=body,
            timeout=aiohttp.ClientTimeout(total=30),
        ) as resp:
            if resp.status != 200:
                raise await relay_error(resp, backend)
            return await resp.json()
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise no_answer("decode", backend, exc, 30) from None


async def _max_model_len(http: aiohttp.ClientSession, backend: Backend, model: Any) -> int:
    """The context length ``backend`` serves ``model`` with (its ``/v1/models``)."""
    data = await _ask(http, backend, "/v1/models")
    cards = data.get("data") if isinstance(data, dict) else None
    known = [
        c
        for c in (cards if isinstance(cards, list) else [])
        if isinstance(c, dict) and isinstance(c.get("max_model_len"), int)
    ]
    named = [c for c in known if c.get("id") == model] or known  # served under its own name
    if named:
        return int(named[0]["max_model_len"])
    raise HandoffError(
        502,
        f"cannot continue: decode server {backend.name} does not say its max_model_len",
        "decode_failed",
        server=backend.name,
    )


async def _detokenize(
    http: aiohttp.ClientSession, backend: Backend, model: Any, ids: list[int]
) -> str | None:
    """The text of ``ids`` by ``backend``'s tokenizer."""
    data = await _ask(http, backend, "/detokenize", {"model": model, "tokens": ids})
    return data.get("prompt") if isinstance(data, dict) else None
