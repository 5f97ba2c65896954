"""Background responses (POST /v1/responses with background: true), as OpenAI's background mode has them: the
request is accepted at once, queued, and runs in a task of the ingress replica that accepted it, detached from the
HTTP request, so a client that hangs up loses nothing. The client polls GET /v1/responses/{id}, streams its events
again (stream=true&starting_after=N, where it was created streaming) or cancels it, through whichever replica it
reaches: what they share is in Redis (router/response_store.py). While the run lasts, this replica refreshes its
run key every RUN_BEAT_S, and reads there whether a cancellation asked it to stop; a replica that dies lets the key
lapse, and the response then reads as failed.

A run counts as one of the replica's requests (api.max_concurrent_requests) and keeps it from shutting down until it
ends, as long as Serve grants (router/ingress.py); its cluster request is cancelled, and its KV blocks freed, as
soon as the response is cancelled.
"""

import asyncio
import contextvars
import logging
from contextlib import aclosing
from typing import Any

import redis

from router.errors import Kind, classify
from router.ingress import GenerateRequest, Ingress
from router.response_store import RUN_BEAT_S, ResponseStore
from router.responses_shape import ResponsesShape
from router.streams import close_all, first_of_each, lasts

logger = logging.getLogger(__name__)


class BackgroundResponses:
    def __init__(self, ingress: Ingress, store: ResponseStore):
        self.ingress = ingress
        self.store = store
        self._runs: set[asyncio.Task] = set()  # held, as the event loop keeps only weak references to tasks

    async def start(self, choice: GenerateRequest, shape: ResponsesShape, events: bool) -> dict[str, Any]:
        """Accepts the response (its request validated) and starts its run; returns it queued. A replica that
        cannot take it refuses it here, as it would any request, rather than store a response that fails. With
        `events`, its events are kept for streaming."""
        self.ingress.admit()
        queued = shape.pending("queued")
        await self.store.start(queued, shape.conversation, events)
        # A context of its own: the run outlives the HTTP request, and nothing of that request's must follow it.
        run = asyncio.create_task(self._run(choice, shape, events), context=contextvars.Context())
        self._runs.add(run)
        run.add_done_callback(self._runs.discard)
        logger.info("background response %s queued", shape.response_id)
        return queued

    async def _run(self, choice: GenerateRequest, shape: ResponsesShape, events: bool) -> None:
        response_id = shape.response_id
        work = asyncio.ensure_future(self._respond(choice, shape, events))
        try:
            while not work.done():
                if await self._cancelled(response_id):
                    logger.info("background response %s cancelled", response_id)
                    work.cancel()
                await asyncio.wait({work}, timeout=RUN_BEAT_S)
        finally:
            work.cancel()
            [outcome] = await asyncio.gather(work, return_exceptions=True)
            if isinstance(outcome, Exception):  # its state could not be saved (Redis failed)
                logger.error("background response %s: %s", response_id, outcome)
            try:
                await self.store.finish(response_id, events)
            except redis.RedisError as e:
                logger.warning("background response %s: its run was not closed (its run key lapses): %s",
                               response_id, e)

    async def _cancelled(self, response_id: str) -> bool:
        try:
            return await self.store.beat(response_id)
        except redis.RedisError as e:
            logger.warning("background response %s: its run key was not refreshed: %s", response_id, e)
            return False

    async def _respond(self, choice: GenerateRequest, shape: ResponsesShape, events: bool) -> None:
        """Runs the request to its end, saving each state the response reaches: in progress once it has its
        first output, then how it ended; with `events`, every server-sent event as it is made."""
        streams = [self.ingress.generate(choice)]
        try:
            firsts = await first_of_each(streams)
            await self.store.advance(shape.pending("in_progress"), shape.conversation, events)
            if not events:
                await shape.response(await lasts(firsts, streams))
                return
            async with aclosing(shape.events(firsts, streams)) as made:
                async for event in made:
                    await self.store.add_event(shape.response_id, event)
        except Exception as e:
            error = classify(e)
            if error.kind is Kind.INTERNAL:
                logger.exception("background response %s failed", shape.response_id)
            for event in await shape.fail(error):
                if events:
                    await self.store.add_event(shape.response_id, event)
        finally:
            await close_all(streams)
