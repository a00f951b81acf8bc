"""RFC 9162 (Certificate Transparency 2.0) Merkle tree hashing, inclusion proofs and their check.

Only the hashing the RFC prescribes (section 2.1.1): a leaf is SHA-256(0x00 || data), an
interior node SHA-256(0x01 || left || right), and a tree of n > 1 leaves splits at the largest
power of two smaller than n. Built bottom-up by pairing neighbours and carrying an odd last node
up unchanged, which yields the same root and paths as the RFC's recursive definition (the tests
check both, and the RFC's published test vectors).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
EMPTY_ROOT = hashlib.sha256(b"").digest()


class ProofError(ValueError):
    """An inclusion proof that does not lead to the given root."""


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def tree_levels(leaves: Sequence[bytes]) -> list[list[bytes]]:
    """Every level of the tree, leaf hashes first, the root's level last (keep it to answer
    many paths of one tree)."""
    levels = [list(leaves)]
    while len(levels[-1]) > 1:
        below = levels[-1]
        above = [node_hash(below[i], below[i + 1]) for i in range(0, len(below) - 1, 2)]
        if len(below) % 2:
            above.append(below[-1])
        levels.append(above)
    return levels


def root(leaves: Sequence[bytes]) -> bytes:
    """The Merkle Tree Hash of these leaf hashes (SHA-256 of nothing for no leaves)."""
    if not leaves:
        return EMPTY_ROOT
    return tree_levels(leaves)[-1][0]


def inclusion_path(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """The audit path of leaf `index`, nearest sibling first (RFC 9162 section 2.1.3.1)."""
    return path_in(tree_levels(leaves), index)


def path_in(levels: Sequence[Sequence[bytes]], index: int) -> list[bytes]:
    """`inclusion_path` from the levels `tree_levels` made."""
    if not 0 <= index < len(levels[0]):
        raise IndexError(f"leaf {index} is not in a tree of {len(levels[0])}")
    path: list[bytes] = []
    for level in levels[:-1]:
        sibling = index ^ 1
        if sibling < len(level):
            path.append(level[sibling])
        index //= 2
    return path


def root_from_path(leaf: bytes, index: int, size: int, path: Sequence[bytes]) -> bytes:
    """The root that `path` leads to from `leaf` at `index` of a tree of `size` leaves.

    The verification algorithm of RFC 9162 section 2.1.3.2; a path of the wrong length or
    shape for that position is refused.
    """
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is outside a tree of {size}")
    fn, sn, node = index, size - 1, leaf
    for sibling in path:
        if len(sibling) != len(leaf):
            raise ProofError("a path element is not a SHA-256 hash")
        if sn == 0:
            raise ProofError("the path is longer than the tree is deep")
        if fn % 2 == 1 or fn == sn:
            node = node_hash(sibling, node)
            while fn % 2 == 0 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            node = node_hash(node, sibling)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("the path is shorter than the tree is deep")
    return node
