"""Association negotiation policy of the acceptor (PS3.7 D.3.3, PS3.8 9.3.3).

* Verification, Patient/Study Root FIND, MOVE, GET, Storage Commitment Push Model (PS3.4 J.3): Explicit VR
  Little Endian preferred, Implicit VR Little Endian otherwise.
* Every other abstract syntax is taken for a Storage SOP Class (:func:`bastion.model.uids.is_storage_sop_class`:
  any UID but the known services, so standard, retired and private storage classes alike): the first proposed
  transfer syntax Bastion stores as received (:data:`bastion.model.uids.STORABLE_TRANSFER_SYNTAXES`), so the
  sender's preference wins and nothing is transcoded; result 4 (transfer syntaxes not supported) if none is.
* A storage class in the deny list (``settings.storage_deny``), and any service Bastion does not provide
  (worklist, MPPS, print, ...): result 3, abstract syntax not supported (PS3.8 9.3.3.2).
* SCP/SCU role selection (PS3.7 D.3.3.4, used by C-GET) is accepted as proposed for the storage classes that
  are not denied, and left out of the answer (the default roles) for anything else: a Storage Commitment
  requester is SCU, and takes the N-EVENT-REPORT of its result on the same association under that default role.
"""

from __future__ import annotations

from collections.abc import Iterable

from bastion.dimse.association import AcceptedContext
from bastion.dimse.pdu import AssociateRQ, PresentationContext, RoleSelection
from bastion.model.uids import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    FIND_MODELS,
    GET_MODELS,
    IMPLICIT_VR_LITTLE_ENDIAN,
    MOVE_MODELS,
    STORABLE_TRANSFER_SYNTAXES,
    STORAGE_COMMITMENT_PUSH,
    VERIFICATION,
    is_storage_sop_class,
)

SERVICE_CLASSES = frozenset({VERIFICATION, *FIND_MODELS, *MOVE_MODELS, *GET_MODELS, STORAGE_COMMITMENT_PUSH})
_STORABLE = frozenset(STORABLE_TRANSFER_SYNTAXES)

RESULT_ACCEPT, RESULT_ABSTRACT_SYNTAX, RESULT_TRANSFER_SYNTAX = 0, 3, 4


def _choose(pc: PresentationContext, deny: frozenset[str]) -> tuple[int, str]:
    proposed = [t for t in pc.transfer_syntaxes if t]
    if pc.abstract_syntax in SERVICE_CLASSES:
        for ts in (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN):
            if ts in proposed:
                return RESULT_ACCEPT, ts
        return RESULT_TRANSFER_SYNTAX, IMPLICIT_VR_LITTLE_ENDIAN
    if is_storage_sop_class(pc.abstract_syntax) and pc.abstract_syntax not in deny:
        for ts in proposed:
            if ts in _STORABLE:
                return RESULT_ACCEPT, ts
        return RESULT_TRANSFER_SYNTAX, IMPLICIT_VR_LITTLE_ENDIAN
    return RESULT_ABSTRACT_SYNTAX, IMPLICIT_VR_LITTLE_ENDIAN


def negotiate(rq: AssociateRQ, storage_deny: Iterable[str] = ()) -> tuple[
        list[PresentationContext], list[RoleSelection], dict[int, AcceptedContext]]:
    """Answer each proposed presentation context and role selection (PS3.8 9.3.3, PS3.7 D.3.3.4).

    ``storage_deny``: Storage SOP Class UIDs refused (result 3), however they are proposed.

    Returns the AC's presentation contexts, the role selections to echo, and the accepted
    contexts by ID.
    """
    deny = frozenset(storage_deny)
    roles = {r.sop_class: r for r in rq.roles if is_storage_sop_class(r.sop_class) and r.sop_class not in deny}
    answered: list[PresentationContext] = []
    accepted: dict[int, AcceptedContext] = {}
    for pc in rq.contexts:
        result, ts = _choose(pc, deny)
        answered.append(PresentationContext(pc.id, pc.abstract_syntax, [ts], result))
        if result == RESULT_ACCEPT:
            role = roles.get(pc.abstract_syntax)
            accepted[pc.id] = AcceptedContext(pc.id, pc.abstract_syntax, ts,
                                              scu_role=role.scu if role else True,
                                              scp_role=role.scp if role else False)
    return answered, list(roles.values()), accepted
