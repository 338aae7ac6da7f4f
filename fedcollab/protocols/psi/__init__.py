"""Private set intersection for vertical collaboration (docs/protocols/psi.md).

* ecdh: ECDH-PSI on ristretto255, a prime-order group (libsodium through rbcl) as pure
  stages (active_init, passive_init, passive_reply, active_match, passive_finish), and
  :func:`psi_align`, the whole exchange in-process with the aligner signature the runner uses
"""

from fedcollab.protocols.psi._ecdh import (
    HASH_PREFIX,
    POINT_BYTES,
    PROTOCOL,
    ActiveState,
    BlindedSet,
    IntersectionNotice,
    PassiveReply,
    PassiveState,
    PsiResult,
    active_init,
    active_match,
    blind,
    domain_tag,
    hash_to_group,
    new_scalar,
    passive_finish,
    passive_init,
    passive_reply,
    psi_align,
    shuffle_order,
    split_points,
)

__all__ = [
    "ActiveState",
    "BlindedSet",
    "HASH_PREFIX",
    "IntersectionNotice",
    "POINT_BYTES",
    "PROTOCOL",
    "PassiveReply",
    "PassiveState",
    "PsiResult",
    "active_init",
    "active_match",
    "blind",
    "domain_tag",
    "hash_to_group",
    "new_scalar",
    "passive_finish",
    "passive_init",
    "passive_reply",
    "psi_align",
    "shuffle_order",
    "split_points",
]
