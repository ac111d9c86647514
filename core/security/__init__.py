"""The security gate: who a connection is (authentication) and what it may do (authorization).

Every adapter reaches the core through a per-connection `CoreSession` (core/session.py), which asks the gate once
per action; no adapter decides on its own. The full policy engine (users, roles, ACL entries) plugs in behind the
same `Gate` protocol.
"""

from tidegate.core.security.gate import (
    ANONYMOUS,
    SYSTEM,
    Action,
    AllowAllGate,
    Credentials,
    Decision,
    Gate,
    Principal,
    Resource,
    ResourceType,
)

__all__ = ["ANONYMOUS", "SYSTEM", "Action", "AllowAllGate", "Credentials", "Decision", "Gate", "Principal",
           "Resource", "ResourceType"]
