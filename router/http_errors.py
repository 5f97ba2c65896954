"""Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with the HTTP status router/errors.py
gives each kind of failure, for every endpoint of the HTTP API."""

import logging

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from router.errors import ApiError, Kind, classify

logger = logging.getLogger(__name__)


class PayloadTooLarge(Exception):
    """A request body over api.max_request_bytes: a 413, refused before it is read whole."""


def refused_response(e: Exception) -> JSONResponse:
    """Whatever a request's path raised, as the error it is."""
    if isinstance(e, PayloadTooLarge):
        return _error_json(413, "invalid_request_error", str(e), None)
    return error_response(classify(e))


def error_response(error: ApiError) -> JSONResponse:
    if error.kind is Kind.INTERNAL:
        logger.error("request failed: %s", error.message)
    headers = {"www-authenticate": "Bearer"} if error.kind is Kind.UNAUTHENTICATED else None
    return _error_json(error.kind.http_status, error.kind.openai_type, error.message, error.field, headers)


async def http_exception_response(_: Request, e: HTTPException) -> JSONResponse:
    """Starlette's own refusals (no such route, a method it does not take) in the same shape."""
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return _error_json(e.status_code, kind, str(e.detail), None, getattr(e, "headers", None))


def _error_json(status: int, kind: str, message: str, param: str | None, headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status, headers=headers)
