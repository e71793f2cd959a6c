"""The dashboard's two admin actions, each behind a confirmation page and a CSRF check:
force-stop a context, revoke a lease. Both go through the domain managers."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response

from pclease_service.dashboard.render import (
    Dashboard,
    DashDep,
    Viewer,
    ViewerDep,
    checked_id,
    holder_text,
)
from pclease_service.errors import ContextNotFound, IllegalTransition, LeaseNotFound, PageError

router = APIRouter(prefix="/ui", include_in_schema=False)

# -- admin actions -----------------------------------------------------------------------------


def _authorise(dash: Dashboard, viewer: Viewer, csrf: str, what: str) -> None:
    if not dash.signer.check_csrf(viewer.session, csrf):
        raise PageError(
            403,
            "Form expired",
            "The form was not sent from this dashboard or your session changed (CSRF check "
            "failed). Reload the page and try again.",
        )
    if not viewer.principal.is_admin:
        raise PageError(
            403,
            "Admin only",
            f"To {what} you need a token with the admin scope; you are signed in as "
            f"{viewer.principal.name!r} with the read scope.",
        )


@router.post("/contexts/{context_id}/stop")
async def stop_context(
    request: Request,
    context_id: str,
    dash: DashDep,
    viewer: ViewerDep,
    csrf: Annotated[str, Form(max_length=200)] = "",
    confirm: Annotated[str, Form(max_length=10)] = "",
) -> Response:
    checked_id(context_id, "context")
    _authorise(dash, viewer, csrf, "force-stop a context")
    try:
        context = await dash.service.contexts.get(context_id)
    except ContextNotFound:
        raise PageError(404, "No such context", f"There is no context {context_id!r}.") from None
    if confirm != "yes":
        return dash.render(
            request,
            "confirm.html",
            viewer=viewer,
            action=f"/ui/contexts/{context_id}/stop",
            back=f"/ui/contexts/{context_id}",
            title=f"Force-stop context {context_id[:8]}?",
            detail=f"This revokes its {context.refcount} live lease(s) now; their tasks will "
            "fail their next heartbeat. The instance stops right after.",
            button="Force-stop",
        )
    try:
        await dash.service.contexts.force_stop(viewer.principal, context_id)
    except ContextNotFound:
        raise PageError(404, "No such context", f"There is no context {context_id!r}.") from None
    except IllegalTransition as exc:
        raise PageError(409, "Nothing to stop", exc.message) from None
    return RedirectResponse(f"/ui/contexts/{context_id}?done=stopped", status_code=303)


@router.post("/leases/{lease_id}/revoke")
async def revoke_lease(
    request: Request,
    lease_id: str,
    dash: DashDep,
    viewer: ViewerDep,
    csrf: Annotated[str, Form(max_length=200)] = "",
    confirm: Annotated[str, Form(max_length=10)] = "",
) -> Response:
    checked_id(lease_id, "lease")
    _authorise(dash, viewer, csrf, "revoke a lease")
    try:
        lease = await dash.service.leases.get(viewer.principal, lease_id)
    except LeaseNotFound:
        raise PageError(404, "No such lease", f"There is no lease {lease_id!r}.") from None
    if lease.state.is_terminal:
        raise PageError(
            409, "Lease already ended", f"Lease {lease_id} is {lease.state.value}; nothing to do."
        )
    if confirm != "yes":
        return dash.render(
            request,
            "confirm.html",
            viewer=viewer,
            action=f"/ui/leases/{lease_id}/revoke",
            back=f"/ui/leases/{lease_id}",
            title=f"Revoke lease {lease_id[:8]}?",
            detail=f"Held by {holder_text(lease)}. Its task loses the compute at its next "
            "heartbeat.",
            button="Revoke",
        )
    ended = await dash.service.leases.revoke(viewer.principal, lease_id)
    if ended is None:
        raise PageError(409, "Lease already ended", f"Lease {lease_id} ended meanwhile.")
    return RedirectResponse(f"/ui/leases/{lease_id}?done=revoked", status_code=303)
