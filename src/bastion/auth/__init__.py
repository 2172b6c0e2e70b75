"""Who is asking: HTTP authentication (OIDC/JWT bearer tokens, API keys, break-glass tokens) and roles."""

from bastion.auth.principal import ANONYMOUS, ROLES, SCOPE_KEY, Principal, principal_in

__all__ = ["ANONYMOUS", "ROLES", "SCOPE_KEY", "Principal", "principal_in"]
