"""Who is calling: the tenant from an API key (when keys are configured) or from a header."""

from __future__ import annotations

import hmac
import re

from fastapi import Request

from monitor.http_errors import APIError

TENANT_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


def tenant_of(request: Request) -> str | None:
    """The tenant: from the API key when keys are configured (401 otherwise), else from the header."""
    settings = request.app.state.settings
    keys = settings.api_keys
    if keys:
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        found = None
        for key, tenant in keys.items():  # compare against every key: constant time per key, no early exit
            if hmac.compare_digest(key.encode(), token.encode()):
                found = tenant
        if found is None:
            raise APIError(401, "missing or invalid API key (send Authorization: Bearer KEY)")
        return found
    raw = request.headers.get(settings.tenant_header)
    if raw is None:
        return None
    if not TENANT_RE.match(raw):
        raise APIError(400, f"{settings.tenant_header}: 1-64 characters of A-Z a-z 0-9 _ . : -")
    return raw
