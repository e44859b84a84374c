"""A login the broker refuses: which errors say so, and the one line that tells the operator (never the password)."""

from __future__ import annotations

import aiormq
from yarl import URL

from sluicegate.errors import BrokerRefused

# What the broker says when it will not let this login in: retrying the same credentials cannot help.
REFUSALS = (
    aiormq.exceptions.ProbableAuthenticationError,  # ACCESS_REFUSED (403) during the handshake
    aiormq.exceptions.AuthenticationError,  # no authentication mechanism in common
    aiormq.exceptions.ConnectionNotAllowed,  # NOT_ALLOWED (530): no access to the virtual host
    aiormq.exceptions.InvalidFrameError,  # how aiormq 6 reports that NOT_ALLOWED: a Close instead of OpenOk
)


def refused(err: BaseException, url: str) -> BrokerRefused:
    """The one-line error for a login the broker refused; names the address, never the password."""
    try:
        parsed = URL(url)
        where = f"{parsed.host}:{parsed.port or 5672}{parsed.path if parsed.path not in ('', '/') else ''}"
        user = parsed.user or "guest"
    except (ValueError, TypeError):
        where, user = "the broker", "the user"
    if isinstance(err, aiormq.exceptions.ConnectionNotAllowed | aiormq.exceptions.InvalidFrameError):
        return BrokerRefused(
            f"the broker at {where} refused the connection: check that the virtual host exists and that user"
            f" {user!r} may use it"
        )
    return BrokerRefused(f"the broker at {where} refused the login of user {user!r}: check the user and password")
