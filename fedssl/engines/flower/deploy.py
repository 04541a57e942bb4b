"""A real deployment: credentials, each client's own data, the SuperLink and SuperNode commands.

``fedssl deploy credentials`` writes a CA, the SuperLink's TLS certificate (for the host
names / IPs it is reached at) and one SuperNode key pair per client (ECDSA P-384, OpenSSH
format, as ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register``
take them). ``fedssl deploy partition`` cuts the training split exactly as the in-process
engine does and writes one folder per client (``partition-<i>/images.npy`` +
``partition.json``): each device gets only its own. ``fedssl deploy superlink`` /
``supernode`` start Flower's own processes with fedssl's flags; ``fedssl deploy
federation`` writes the connection into Flower's configuration file for ``flwr run``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import ipaddress
import json
import os
import shutil
import socket
import sys
import tomllib
from pathlib import Path

import numpy as np

from fedssl.config import RunConfig
from fedssl.errors import FedSSLError
from fedssl.engines.flower.partitions import (IMAGES_FILE, PARTITION_FILE, check_partition_dir,  # noqa: F401
                                            digest, partition_key)
from fedssl.io import atomic_write_bytes, atomic_write_text

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
SUPERNODE_KEY = "supernode-{}"  # private key; the public key is the same name + ".pub"
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
SUPERLINK_PORT = 9093
SUPERNODE_PORT = 9094  # a SuperNode's own port for its ClientApps (+ partition id, so that nodes can share a host)
FLEET_POLL_SECONDS = 0.1  # a SuperNode's longest wait between two looks for messages (Flower 1.41's own: 3 s)


# ------------------------------------------------------------------ credentials


def make_credentials(out: str | Path, *, hosts: tuple[str, ...] = DEFAULT_HOSTS, supernodes: int = 0,
                     days: int = 365) -> dict[str, Path]:
    """CA + SuperLink certificate valid for ``hosts``; ``supernodes`` SuperNode key pairs. Returns the paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedssl federation CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .sign(ca_key, hashes.SHA256()))
    server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_cert = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
                   .issuer_name(ca_name).public_key(server_key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=days))
                   .add_extension(x509.SubjectAlternativeName(names), critical=False)
                   .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    plain = serialization.NoEncryption()
    paths = {"ca_cert": folder / CA_CERT, "ca_key": folder / CA_KEY, "server_cert": folder / SERVER_CERT,
             "server_key": folder / SERVER_KEY}
    atomic_write_bytes(paths["ca_cert"], ca_cert.public_bytes(pem))
    atomic_write_bytes(paths["ca_key"], ca_key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL, plain))
    atomic_write_bytes(paths["server_cert"], server_cert.public_bytes(pem))
    atomic_write_bytes(paths["server_key"],
                       server_key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL, plain))
    for i in range(supernodes):
        key = ec.generate_private_key(ec.SECP384R1())
        private = folder / SUPERNODE_KEY.format(i)
        atomic_write_bytes(private, key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, plain))
        atomic_write_bytes(private.with_name(private.name + ".pub"), key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
        paths[f"supernode_{i}"] = private
    for name in (CA_KEY, SERVER_KEY, *(SUPERNODE_KEY.format(i) for i in range(supernodes))):
        os.chmod(folder / name, 0o600)
    return paths


# ------------------------------------------------------------------ each client's own data


def export_partitions(cfg: RunConfig, out: str | Path) -> list[Path]:
    """One folder per client with ONLY its images (as the in-process engine partitions them); their paths."""
    from fedssl.engines.flower.server import check_flower_config, num_partitions
    from fedssl.engines.local import load_federation
    from fedssl.methods import METHODS

    check_flower_config(cfg)
    fed = load_federation(cfg, pooled=METHODS[cfg.method].pooled_data)
    info = fed.train.info
    folders = []
    for i in range(num_partitions(cfg)):
        folder = Path(out) / f"partition-{i}"
        images = fed.client_data(i).images  # (N_i, C, H, W) uint8
        buffer = io.BytesIO()
        np.save(buffer, images.numpy(), allow_pickle=False)
        atomic_write_bytes(folder / IMAGES_FILE, buffer.getvalue())
        meta = {"partition-id": i, "num-partitions": num_partitions(cfg), "key": partition_key(cfg),
                "num-samples": int(images.shape[0]), "digest": digest(images),
                "info": {**info.__dict__, "image_size": int(images.shape[-1])}}
        atomic_write_text(folder / PARTITION_FILE, json.dumps(meta, indent=1))
        folders.append(folder)
    return folders


# ------------------------------------------------------------------ the processes


def flower_bin(name: str) -> str:
    """A Flower executable of this Python environment (so that its children find theirs too)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def flower_env() -> dict[str, str]:
    """The environment Flower's processes need: this environment's executables first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    return env


def tls_args(certs: str | Path | None, *, server: bool) -> list[str]:
    """``--insecure`` without certificates; else the SuperLink's certificate (server) or the CA (SuperNode)."""
    if certs is None:
        return ["--insecure"]
    folder = Path(certs).expanduser().resolve()
    needed = [CA_CERT, SERVER_CERT, SERVER_KEY] if server else [CA_CERT]
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise FedSSLError(f"{folder} lacks {', '.join(missing)}; write them with fedssl deploy credentials --out "
                          f"{folder}")
    if not server:
        return ["--root-certificates", str(folder / CA_CERT)]
    return ["--ssl-ca-certfile", str(folder / CA_CERT), "--ssl-certfile", str(folder / SERVER_CERT),
            "--ssl-keyfile", str(folder / SERVER_KEY)]


def superlink_command(*, host: str = "0.0.0.0", port: int = SUPERLINK_PORT, certs: str | Path | None = None,
                      auth: bool = False, database: str | None = None) -> list[str]:
    """``flower-superlink`` as fedssl runs it: one port for the Fleet, Control and Runtime APIs; no dependency
    installation at run time (the nodes run the fedssl they have)."""
    if auth and certs is None:
        raise FedSSLError("SuperNode authentication needs TLS: pass --certs DIR (fedssl deploy credentials)")
    command = [flower_bin("flower-superlink"), "--host", host, "--port", str(port),
               "--disable-runtime-dependency-installation", *tls_args(certs, server=True)]
    if auth:
        command.append("--enable-supernode-auth")
    if database:
        command += ["--database", database]
    return command


def supernode_command(*, superlink: str, partition_id: int, num_partitions: int, data_dir: str | Path,
                      port: int | None = None, certs: str | Path | None = None, key: str | Path | None = None,
                      node_config: str = "", per_message: bool = False,
                      fleet_poll: float | None = FLEET_POLL_SECONDS) -> list[str]:
    """The SuperNode of client ``partition_id``, reading only ``data_dir``: by default with the node's
    long-lived worker and the Fleet polling capped at ``fleet_poll`` s (``fedssl.engines.flower.supernode``);
    ``per_message=True, fleet_poll=None`` is Flower's own ``flower-supernode`` (a ClientApp process per message)."""
    if fleet_poll is not None and not 0.01 <= fleet_poll <= 60:
        raise FedSSLError(f"--fleet-poll {fleet_poll:g} is outside 0.01..60 s; 0.1 is the default, 3 Flower's own")
    conf = (f'partition-id={partition_id} num-partitions={num_partitions} '
            f'data-dir="{Path(data_dir).expanduser().resolve()}" {node_config}').strip()
    flower_args = ["--superlink", superlink, "--host", "127.0.0.1",
                   "--port", str(port if port is not None else SUPERNODE_PORT + partition_id), "--node-config", conf,
                   *tls_args(certs, server=False)]
    if key is not None:
        if certs is None:
            raise FedSSLError("SuperNode authentication needs TLS: pass --certs DIR with the federation's ca.crt")
        flower_args += ["--auth-supernode-private-key", str(Path(key).expanduser().resolve())]
    if per_message and fleet_poll is None:
        return [flower_bin("flower-supernode"), *flower_args]
    ours = ([] if per_message else ["--worker"]) + ([] if fleet_poll is None else ["--fleet-poll", f"{fleet_poll:g}"])
    return [sys.executable, "-m", "fedssl.engines.flower.supernode", *ours, "--", *flower_args]


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A clear error when nothing listens at the SuperLink's ``host:port``."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout):
            return
    except (OSError, ValueError) as err:
        raise FedSSLError(f"cannot reach the SuperLink at {address} ({err.__class__.__name__}); start it with "
                          "fedssl deploy superlink, or fix --superlink HOST:PORT") from None


def write_federation(name: str, address: str, *, certs: str | Path | None = None,
                     flwr_home: str | Path | None = None) -> Path:
    """Add (or replace) the SuperLink connection ``name`` in Flower's config file ($FLWR_HOME/config.toml)."""
    import tomli_w

    home = Path(flwr_home or os.environ.get("FLWR_HOME") or Path.home() / ".flwr")
    path = home / "config.toml"
    values = tomllib.loads(path.read_text()) if path.is_file() else {}
    links = values.setdefault("superlink", {})
    entry: dict[str, object] = {"address": address}
    if certs is None:
        entry["insecure"] = True
    else:
        ca = Path(certs).expanduser().resolve() / CA_CERT
        if not ca.is_file():
            raise FedSSLError(f"{ca.parent} lacks {CA_CERT}; write it with fedssl deploy credentials --out {ca.parent}")
        entry["root-certificates"] = str(ca)
    links[name] = entry
    links.setdefault("default", name)
    atomic_write_text(path, tomli_w.dumps(values))
    return path


# ------------------------------------------------------------------ fedssl deploy ...


def add_deploy_commands(sub: argparse._SubParsersAction) -> None:
    """``fedssl deploy credentials | partition | superlink | supernode | federation``."""
    deploy = sub.add_parser("deploy", help="a real Flower deployment: credentials, client data, SuperLink, SuperNodes")
    steps = deploy.add_subparsers(dest="step", required=True)

    cred = steps.add_parser("credentials", help="a CA, the SuperLink's TLS certificate and SuperNode key pairs")
    cred.add_argument("--out", required=True, help="folder to write (ca.crt, server.pem, supernode-<i>[.pub] ...)")
    cred.add_argument("--host", action="append", help="a name or IP the SuperLink is reached at (repeatable; "
                                                      "default 127.0.0.1 and localhost)")
    cred.add_argument("--supernodes", type=int, default=0, help="SuperNode key pairs to write (authentication)")

    part = steps.add_parser("partition", help="one folder per client holding only its images (for its device)")
    part.add_argument("--config", help="a TOML preset, e.g. configs/cifar10/fedmoco.toml")
    part.add_argument("--method", help="the method (it decides whether the server holds out data)")
    part.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    part.add_argument("--out", required=True, help="folder that receives partition-<i>/ for every client")

    link = steps.add_parser("superlink", help="start flower-superlink with fedssl's flags (runs in the foreground)")
    link.add_argument("--host", default="0.0.0.0")
    link.add_argument("--port", type=int, default=SUPERLINK_PORT, help="one port for the Fleet, Control and "
                                                                       "Runtime APIs (default 9093)")
    link.add_argument("--certs", help="credentials folder: TLS on (default: --insecure)")
    link.add_argument("--auth", action="store_true", help="only registered SuperNodes may connect (needs --certs)")
    link.add_argument("--database", help="state file (default: in memory)")

    node = steps.add_parser("supernode", help="start flower-supernode for one client (runs in the foreground)")
    node.add_argument("--superlink", required=True, help="the SuperLink's HOST:PORT")
    node.add_argument("--partition-id", type=int, required=True)
    node.add_argument("--num-partitions", type=int, required=True)
    node.add_argument("--data-dir", required=True, help="this client's folder from fedssl deploy partition")
    node.add_argument("--port", type=int, help=f"the node's own ClientApp port (default {SUPERNODE_PORT} + "
                                               "partition id)")
    node.add_argument("--certs", help="credentials folder holding ca.crt: TLS on (default: --insecure)")
    node.add_argument("--key", help="this node's private key (authentication; its .pub must be registered)")
    node.add_argument("--node-config", default="", help="extra node config, e.g. 'device=\"cuda\"'")
    node.add_argument("--fleet-poll", type=float, default=FLEET_POLL_SECONDS,
                      help=f"longest wait between two looks for messages, s (default {FLEET_POLL_SECONDS:g}; "
                           "Flower's own is 3)")
    node.add_argument("--clientapp-per-message", action="store_true",
                      help="Flower's default: a new flwr-clientapp process per message (no long-lived worker)")

    fed = steps.add_parser("federation", help="add a SuperLink connection to Flower's config ($FLWR_HOME/config.toml)")
    fed.add_argument("name", help="the name to use in flwr run . NAME")
    fed.add_argument("--superlink", required=True, help="the SuperLink's HOST:PORT")
    fed.add_argument("--certs", help="credentials folder holding ca.crt (default: insecure)")
    deploy.set_defaults(func=cmd_deploy)


def cmd_deploy(args: argparse.Namespace, console: object) -> int:
    say = getattr(console, "print", print)
    if args.step == "credentials":
        hosts = tuple(args.host) if args.host else DEFAULT_HOSTS
        if args.supernodes < 0:
            raise FedSSLError("--supernodes must be >= 0")
        paths = make_credentials(args.out, hosts=hosts, supernodes=args.supernodes)
        say(f"wrote {len(paths)} files to {args.out} (TLS for {', '.join(hosts)}; {args.supernodes} SuperNode keys)")
    elif args.step == "partition":
        from fedssl.config import load_toml, make_config

        cfg = make_config(load_toml(args.config) if args.config else {}, args.set or [], method=args.method)
        folders = export_partitions(cfg, args.out)
        say(f"wrote {len(folders)} client folders to {args.out}: give partition-<i> to the SuperNode of client i")
    elif args.step == "superlink":
        _exec(superlink_command(host=args.host, port=args.port, certs=args.certs, auth=args.auth,
                                database=args.database))
    elif args.step == "supernode":
        command = supernode_command(superlink=args.superlink, partition_id=args.partition_id,
                                    num_partitions=args.num_partitions, data_dir=args.data_dir, port=args.port,
                                    certs=args.certs, key=args.key, node_config=args.node_config,
                                    per_message=args.clientapp_per_message, fleet_poll=args.fleet_poll)
        check_partition_dir(args.data_dir, args.partition_id, args.num_partitions)
        check_reachable(args.superlink)
        _exec(command)
    else:
        path = write_federation(args.name, args.superlink, certs=args.certs)
        say(f"wrote the connection {args.name!r} to {path}; run with: flwr run . {args.name}")
    return 0


def _exec(command: list[str]) -> None:
    """Become the Flower process (signals reach it directly; its exit status is ours)."""
    sys.stdout.flush()
    os.execvpe(command[0], command, flower_env())
