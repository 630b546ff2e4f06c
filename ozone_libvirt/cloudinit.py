"""cloud-init NoCloud seeds: the ``cloud_init`` section of a config as the files of a
``cidata`` ISO (meta-data, user-data), and the ISO itself, made in Python with pycdlib.

:func:`seed_files` is pure; :func:`default_ssh_keys` reads the invoking user's public keys;
:func:`make_iso` builds the image in memory (a seed is a few KiB).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pwd
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path
from typing import Any

from .config import SSH_KEY_RE, CloudInit, Share, VMConfig
from .domain_xml import share_tag
from .errors import ConfigError

# what cloud-init does on images that lack the guest agent (Debian's and Ubuntu's cloud
# images): install it and start it (its udev rule starts it on later boots)
AGENT_PACKAGE = "qemu-guest-agent"
AGENT_START = ("systemctl", "start", "qemu-guest-agent")
MAX_USER_DATA = 1 << 20
MAX_DEFAULT_KEYS = 16


def invoking_home() -> Path:
    """The home of the person running ozone (under sudo: the user who ran sudo)."""
    sudo_user = os.environ.get("SUDO_USER")
    if os.geteuid() == 0 and sudo_user:
        try:
            return Path(pwd.getpwnam(sudo_user).pw_dir)
        except KeyError:
            pass
    return Path.home()


def default_ssh_keys(home: Path | None = None) -> tuple[str, ...]:
    """The invoking user's ``~/.ssh/id_*.pub`` keys (malformed ones skipped)."""
    folder = (home or invoking_home()) / ".ssh"
    keys: list[str] = []
    try:
        candidates = sorted(folder.glob("id_*.pub"))
    except OSError:
        return ()
    for path in candidates[:MAX_DEFAULT_KEYS]:
        try:
            text = path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            continue
        if len(text) < 4096 and SSH_KEY_RE.fullmatch(text):
            keys.append(text)
    return tuple(keys)


def files_digest(files: dict[str, bytes], *, prefix: bytes = b"") -> str:
    """SHA-256 (hex) of ``prefix`` and the files, names and contents, in name order."""
    digest = hashlib.sha256(prefix)
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name] + b"\0")
    return digest.hexdigest()


def instance_id(config: VMConfig, files: dict[str, bytes]) -> str:
    return "ozone-" + files_digest(files, prefix=config.name.encode())[:16]


def mount_unit_name(folder: str) -> str:
    """systemd's name for the mount unit of ``folder`` (``systemd-escape --path --suffix
    mount``), for folders as the config allows them (letters, digits, ``_.@+-``)."""
    trimmed = folder.strip("/")
    out = []
    for i, ch in enumerate(trimmed):
        if ch == "/":
            out.append("-")
        elif (ch.isascii() and (ch.isalnum() or ch in ":_")) or (ch == "." and i > 0):
            out.append(ch)
        else:
            out.append(f"\\x{ord(ch):02x}")
    return "".join(out) + ".mount"


def mount_unit(share: Share, tag: str) -> str:
    """A systemd mount unit that mounts ``share`` at boot. Wanted, not required, by
    local-fs.target (fstab's nofail): a share that is gone fails no boot."""
    options = "ro" if share.readonly else "rw"
    return (
        "# ozone: a host folder shared through virtio-fs\n"
        f"[Unit]\nDescription=ozone share {tag} ({share.host})\n\n"
        f"[Mount]\nWhat={tag}\nWhere={share.guest}\nType=virtiofs\nOptions={options}\n\n"
        "[Install]\nWantedBy=local-fs.target\n"
    )


def cloud_config(
    ci: CloudInit,
    *,
    hostname: str,
    default_keys: tuple[str, ...],
    install_agent: bool,
    vm_key: str | None = None,
    shares: tuple[Share, ...] = (),
) -> dict[str, Any]:
    """The ``#cloud-config`` document for ``ci``. ``vm_key``: the public half of the VM's
    own ssh key (`ozone ssh`), authorised for the first user, else for root. ``shares``: the
    host folders the guest mounts at boot (systemd mount units)."""
    doc: dict[str, Any] = {"hostname": hostname, "preserve_hostname": False}
    if ci.users:
        doc["users"] = [
            {
                "name": u.name,
                "shell": u.shell or "/bin/bash",
                "lock_passwd": u.lock_passwd,
                **(
                    {"ssh_authorized_keys": list(u.ssh_authorized_keys)}
                    if u.ssh_authorized_keys
                    else {}
                ),
                **({"sudo": "ALL=(ALL) NOPASSWD:ALL"} if u.sudo else {}),
                **({"groups": ",".join(u.groups)} if u.groups else {}),
            }
            for u in ci.users
        ]
        if vm_key:
            doc["users"][0].setdefault("ssh_authorized_keys", []).append(vm_key)
    keys = ci.ssh_authorized_keys or (() if ci.users else default_keys)
    if vm_key and not ci.users:  # `ozone ssh` logs in as root
        keys += (vm_key,)
        doc["disable_root"] = False
    if keys:  # for the image's default user (debian, ubuntu), and root with vm_key
        doc["ssh_authorized_keys"] = list(keys)
    packages = list(ci.packages)
    runcmd: list[Any] = []
    if install_agent:
        if AGENT_PACKAGE not in packages:
            packages.append(AGENT_PACKAGE)
        runcmd.append(list(AGENT_START))
    if packages:
        doc["packages"] = packages
    write_files = [
        {
            "path": f.path,
            "content": f.content,
            **({"permissions": f.permissions} if f.permissions else {}),
            **({"owner": f.owner} if f.owner else {}),
            **({"append": True} if f.append else {}),
        }
        for f in ci.write_files
    ]
    units = []
    for i, share in enumerate(shares):
        unit = mount_unit_name(share.guest)
        units.append(unit)
        write_files.append(
            {
                "path": f"/etc/systemd/system/{unit}",
                "content": mount_unit(share, share_tag(i)),
                "permissions": "0644",
            }
        )
    if units:  # mounted before the config's own commands run
        runcmd += [["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", *units]]
    if write_files:
        doc["write_files"] = write_files
    runcmd += [list(c) if isinstance(c, tuple) else c for c in ci.runcmd]
    if runcmd:
        doc["runcmd"] = runcmd
    return doc


def seed_files(
    config: VMConfig,
    *,
    default_keys: tuple[str, ...] = (),
    install_agent: bool = False,
    user_data: bytes | None = None,
    vm_key: str | None = None,
) -> dict[str, bytes]:
    """meta-data and user-data for ``config`` (which has a ``cloud_init`` section, or is a
    pulled image that needs the agent installed). ``user_data``: the content of the config's
    ``user_data`` file, added as a second MIME part after ozone's cloud-config."""
    ci = config.cloud_init or CloudInit()
    hostname = ci.hostname or config.name.replace("_", "-").replace(".", "-")[:63].strip("-")
    doc = cloud_config(
        ci,
        hostname=hostname,
        default_keys=default_keys,
        install_agent=install_agent,
        vm_key=vm_key,
        shares=config.shares,
    )
    # JSON is YAML: cloud-init reads it, and its quoting is exact for any string
    ours = "#cloud-config\n" + json.dumps(doc, indent=1, ensure_ascii=False) + "\n"
    body = ours.encode() if user_data is None else _multipart(ours, user_data)
    files = {"user-data": body}
    meta = {"instance-id": instance_id(config, files), "local-hostname": hostname}
    files["meta-data"] = (json.dumps(meta, indent=1) + "\n").encode()
    return files


def _multipart(ours: str, theirs: bytes) -> bytes:
    text = theirs.decode("utf-8", errors="replace")
    first = text.split("\n", 1)[0].strip()
    subtype = (
        "cloud-config" if first.startswith("#cloud-config")
        else "x-shellscript" if first.startswith("#!")
        else "cloud-boothook" if first.startswith("#cloud-boothook")
        else "x-include-url" if first.startswith("#include")
        else "plain"
    )  # fmt: skip
    message = MIMEMultipart()
    message.attach(MIMEText(ours, "cloud-config", "utf-8"))
    part = MIMEText(text, subtype, "utf-8")
    # lists (users, packages, runcmd) of the user's part add to ozone's instead of replacing
    part["Merge-Type"] = "list(append)+dict(no_replace,recurse_list)+str()"
    message.attach(part)
    return message.as_bytes()


def read_user_data(config: VMConfig) -> bytes | None:
    ci = config.cloud_init
    if ci is None or ci.user_data is None:
        return None
    where = "cloud_init.user_data"
    try:
        with ci.user_data.open("rb") as handle:
            data = handle.read(MAX_USER_DATA + 1)
    except OSError as err:
        raise ConfigError(
            f"cannot read {ci.user_data}: {err.strerror}", file=_source(config), field=where
        ) from None
    if len(data) > MAX_USER_DATA:
        raise ConfigError(
            f"{ci.user_data} is over {MAX_USER_DATA // 1024} KiB", file=_source(config), field=where
        )
    return data


def _source(config: VMConfig) -> str | None:
    return str(config.source) if config.source else None


def make_iso(files: dict[str, bytes]) -> bytes:
    """A ``cidata`` ISO 9660 image (Joliet and Rock Ridge names) holding ``files``."""
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for name, data in sorted(files.items()):
        short = name.upper().replace("-", "_")[:8] + ".;1"
        iso.add_fp(io.BytesIO(data), len(data), "/" + short, rr_name=name, joliet_path="/" + name)
    out = io.BytesIO()
    iso.write_fp(out)
    iso.close()
    return out.getvalue()
