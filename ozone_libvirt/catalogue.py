"""Cloud images ozone knows by name (``image: debian-12``, ``ozone image pull ubuntu-24.04``):
their official download address and the checksum file published beside them. Pure data."""

from __future__ import annotations

from typing import NamedTuple


class CatalogueImage(NamedTuple):
    url: str
    checksum_url: str
    about: str


_DEBIAN = "https://cloud.debian.org/images/cloud"
_UBUNTU = "https://cloud-images.ubuntu.com"

CATALOGUE: dict[str, CatalogueImage] = {
    "debian-12": CatalogueImage(
        f"{_DEBIAN}/bookworm/latest/debian-12-genericcloud-amd64.qcow2",
        f"{_DEBIAN}/bookworm/latest/SHA512SUMS",
        "Debian 12 (bookworm) generic cloud image",
    ),
    "debian-13": CatalogueImage(
        f"{_DEBIAN}/trixie/latest/debian-13-genericcloud-amd64.qcow2",
        f"{_DEBIAN}/trixie/latest/SHA512SUMS",
        "Debian 13 (trixie) generic cloud image",
    ),
    "ubuntu-22.04": CatalogueImage(
        f"{_UBUNTU}/jammy/current/jammy-server-cloudimg-amd64.img",
        f"{_UBUNTU}/jammy/current/SHA256SUMS",
        "Ubuntu 22.04 LTS (jammy) server cloud image",
    ),
    "ubuntu-24.04": CatalogueImage(
        f"{_UBUNTU}/noble/current/noble-server-cloudimg-amd64.img",
        f"{_UBUNTU}/noble/current/SHA256SUMS",
        "Ubuntu 24.04 LTS (noble) server cloud image",
    ),
}
