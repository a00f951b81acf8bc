"""The audit context of a request, as a FastAPI dependency: who acted, from where, in which
request and trace. The task routes pass it to the rules, which hand it to the recorder.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from opentelemetry import trace

from audit.recorder import AuditContext
from service.deps import CurrentUser


def _header_text(value: str | None) -> str | None:
    """Header bytes as a browser sent them: UTF-8 where they are (Starlette reads every
    header as Latin-1, which would record `é` as `Ã©`), else Latin-1, byte for byte."""
    if value is None:
        return None
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        return value


async def get_audit_context(request: Request, user: CurrentUser) -> AuditContext:
    span_context = trace.get_current_span().get_span_context()
    trace_id = span_id = None
    if span_context.is_valid:
        trace_id = trace.format_trace_id(span_context.trace_id)
        span_id = trace.format_span_id(span_context.span_id)
    return AuditContext(
        actor_id=user.user_id,
        request_id=getattr(request.state, "request_id", None),
        # The socket's peer, or the client a trusted proxy named (service.middleware).
        client_ip=request.client.host if request.client else None,
        user_agent=_header_text(request.headers.get("user-agent")),
        trace_id=trace_id,
        span_id=span_id,
    )


AuditCtx = Annotated[AuditContext, Depends(get_audit_context)]
