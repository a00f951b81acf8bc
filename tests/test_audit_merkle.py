"""RFC 9162 Merkle hashing: the RFC 6962 test vectors, and the RFC's recursive definitions
(MTH and PATH, written out here from the text) against the bottom-up implementation."""

from __future__ import annotations

import contextlib
import hashlib

import pytest

from audit import merkle

# The Certificate Transparency reference inputs and the roots of trees of 0..8 of them.
CT_DATA = [
    bytes.fromhex(h)
    for h in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_PATHS = {
    (0, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (5, 8): [
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
}
CT_LEAVES = [merkle.leaf_hash(d) for d in CT_DATA]


def _split(n: int) -> int:
    """The largest power of two smaller than n (RFC 9162 section 2.1.1)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def rfc_mth(leaves: list[bytes]) -> bytes:
    """MTH(D[n]) exactly as the RFC defines it, on leaf hashes."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = _split(len(leaves))
    return hashlib.sha256(b"\x01" + rfc_mth(leaves[:k]) + rfc_mth(leaves[k:])).digest()


def rfc_path(m: int, leaves: list[bytes]) -> list[bytes]:
    """PATH(m, D[n]) exactly as the RFC defines it."""
    if len(leaves) == 1:
        return []
    k = _split(len(leaves))
    if m < k:
        return [*rfc_path(m, leaves[:k]), rfc_mth(leaves[k:])]
    return [*rfc_path(m - k, leaves[k:]), rfc_mth(leaves[:k])]


def test_the_roots_of_the_rfc_6962_test_vectors() -> None:
    for size, expected in enumerate(CT_ROOTS):
        assert merkle.root(CT_LEAVES[:size]).hex() == expected, size


def test_the_inclusion_paths_of_the_rfc_6962_test_vectors() -> None:
    for (index, size), expected in CT_PATHS.items():
        path = merkle.inclusion_path(CT_LEAVES[:size], index)
        assert [node.hex() for node in path] == expected
        root = merkle.root_from_path(CT_LEAVES[index], index, size, path)
        assert root.hex() == CT_ROOTS[size]


def test_leaves_and_nodes_are_hashed_apart() -> None:
    """The 0x00/0x01 prefixes: a node's two children cannot pass as one leaf's data."""
    a, b = CT_LEAVES[1], CT_LEAVES[2]
    assert merkle.node_hash(a, b) != merkle.leaf_hash(a + b)
    assert merkle.leaf_hash(b"") == hashlib.sha256(b"\x00").digest()


@pytest.mark.parametrize("size", [*range(1, 70), 127, 128, 129, 255, 257, 1000])
def test_root_and_paths_match_the_rfc_definitions_and_round_trip(size: int) -> None:
    leaves = [merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(size)]
    root = merkle.root(leaves)
    assert root == rfc_mth(leaves)
    indexes = range(size) if size <= 129 else (0, 1, size // 2, size - 2, size - 1)
    for index in indexes:
        path = merkle.inclusion_path(leaves, index)
        assert path == rfc_path(index, leaves)
        assert merkle.root_from_path(leaves[index], index, size, path) == root
        # Another leaf, another position or another tree size does not lead to this root.
        other = leaves[(index + 1) % size]
        if other != leaves[index]:
            assert merkle.root_from_path(other, index, size, path) != root
        if size > 1:
            moved = (index + 1) % size
            with contextlib.suppress(merkle.ProofError):
                assert merkle.root_from_path(leaves[index], moved, size, path) != root


@pytest.mark.parametrize("size", [2, 3, 5, 8, 13, 64, 100])
def test_paths_of_the_wrong_shape_are_refused(size: int) -> None:
    leaves = [merkle.leaf_hash(bytes([i])) for i in range(size)]
    path = merkle.inclusion_path(leaves, size - 1)
    with pytest.raises(merkle.ProofError):
        merkle.root_from_path(leaves[-1], size - 1, size, path[:-1])
    with pytest.raises(merkle.ProofError):
        merkle.root_from_path(leaves[-1], size - 1, size, [*path, leaves[0]])
    with pytest.raises(merkle.ProofError):
        merkle.root_from_path(leaves[-1], size, size, path)
    with pytest.raises(merkle.ProofError):
        merkle.root_from_path(leaves[-1], size - 1, size, [b"short", *path[1:]])
    tampered = [bytes([path[0][0] ^ 1]) + path[0][1:], *path[1:]]
    assert merkle.root_from_path(leaves[-1], size - 1, size, tampered) != merkle.root(leaves)
