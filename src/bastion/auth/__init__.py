"""Who is asking: HTTP authentication (OIDC/JWT bearer tokens, API keys, break-glass tokens) and roles."""

from bastion.auth.principal import ANONYMOUS, ROLES, Principal

__all__ = ["ANONYMOUS", "ROLES", "Principal"]
