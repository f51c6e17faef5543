"""OpenAI-style error bodies, produced once at the ingress boundary.

Bodies use vLLM's `ErrorResponse` model ({"error": {"message", "type", "param", "code"}}), the same shape
vLLM's own server returns, so clients see one error vocabulary whichever layer refused the request.
"""

from __future__ import annotations

from http import HTTPStatus

from fastapi.responses import JSONResponse
from vllm.entrypoints.serve.engine.protocol import ErrorInfo, ErrorResponse


class OpenAIHTTPError(Exception):
    """Raised anywhere in the ingress; turned into an error body by the app's exception handler."""

    def __init__(self, status: int, message: str, err_type: str | None = None, param: str | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        phrase = HTTPStatus(status).phrase.replace(" ", "")
        self.err_type = err_type or (phrase if phrase.endswith("Error") else phrase + "Error")
        self.param = param
        self.retry_after_s = retry_after_s

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.err_type, param=self.param,
                                             code=self.status))

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(max(int(round(self.retry_after_s)), 1))} if self.retry_after_s else None
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=headers)


def error_response_json(response: ErrorResponse) -> JSONResponse:
    return JSONResponse(response.model_dump(), status_code=int(response.error.code))
