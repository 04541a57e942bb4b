"""Where Flower's simulation runtime runs its ClientApps: a Ray instance it starts here, or a running Ray cluster.

``flower.ray_address = ""``: Flower starts Ray on this machine with all its cores. ``"HOST:PORT"``: the
head of a Ray cluster (``ray start --head --port=PORT``, each worker ``ray start --address=HOST:PORT``);
Flower's Ray backend joins it (``ray.init(address=...)`` through the backend's ``init_args``) and
places one ClientApp actor per ``flower.client_cpus`` cores (and ``flower.client_gpus`` GPUs) of
every node. Before that, :func:`cluster_nodes` checks that a cluster answers there and that one
ClientApp fits on some node, and returns its nodes for the run's ``engine.json``.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from fedssl.config import RAY_ADDRESS, RunConfig
from fedssl.errors import FedSSLError

CONNECT_SECONDS = 5.0  # a head that does not accept a TCP connection within this is not there


def silence_gpu_notice() -> None:
    """Ray's notice about its handling of CUDA_VISIBLE_DEVICES on CPU-only actors, off for every driver here."""
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def client_resources(cfg: RunConfig) -> dict[str, float]:
    """What Ray reserves per ClientApp: ``flower.client_cpus`` cores (on a local Ray at most this machine's)."""
    cpus = cfg.flower.client_cpus if cfg.flower.ray_address else min(cfg.flower.client_cpus, os.cpu_count() or 1)
    gpus = 0.0 if cfg.device == "cpu" else cfg.flower.client_gpus
    return {"num_cpus": cpus, "num_gpus": gpus}


def simulation_backend(cfg: RunConfig) -> dict[str, Any]:
    """The backend config of ``run_simulation``: the resources per ClientApp and how Ray starts (or is joined)."""
    quiet = {"logging_level": "ERROR", "log_to_driver": False}
    if cfg.flower.ray_address:  # a cluster's resources are its nodes': ray.init takes no num_cpus then
        return {"client_resources": client_resources(cfg), "init_args": {"address": cfg.flower.ray_address, **quiet}}
    return {"client_resources": client_resources(cfg), "init_args": {"num_cpus": os.cpu_count() or 1, **quiet}}


def check_cuda_share(cfg: RunConfig) -> None:
    """A cuda run whose ClientApps reserve no GPU would see none (Ray hides them): refused with the fix."""
    if cfg.device != "cpu" and cfg.flower.client_gpus == 0:
        raise FedSSLError(f"device = {cfg.device} but flower.client_gpus = 0, so Ray would hide every GPU from the "
                          "ClientApps; set flower.client_gpus (e.g. 0.5) or device = cpu")


def _answers(address: str) -> None:
    """A TCP connection to the head (``ray.init`` itself retries for minutes): FedSSLError naming the fix."""
    match = RAY_ADDRESS.fullmatch(address)
    assert match is not None  # the config's validation checked the form
    host, port = match["host"].strip("[]"), int(match["port"])
    try:
        socket.create_connection((host, port), timeout=CONNECT_SECONDS).close()
    except OSError as err:
        raise FedSSLError(f"no Ray cluster answers at flower.ray_address = {address} ({err.strerror or err}); start "
                          f"its head there (ray start --head --port={port}, then ray start --address={address} on "
                          "each worker) or set flower.ray_address = \"\" to let Flower start Ray on this machine"
                          ) from None


def _alive_nodes(address: str) -> list[dict[str, Any]]:
    """The live nodes of the cluster at ``address``: ip, CPUs, GPUs (a short-lived driver of its own)."""
    import ray

    silence_gpu_notice()
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False, include_dashboard=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise FedSSLError(f"the Ray cluster at flower.ray_address = {address} refused this driver ({err}); run "
                          f"fedssl on a node of that cluster, with the same Python and Ray ({ray.__version__}) as its "
                          "other nodes") from None
    try:
        nodes = [node for node in ray.nodes() if node.get("Alive")]
    finally:
        ray.shutdown()
    return [{"ip": node["NodeManagerAddress"], "cpus": node["Resources"].get("CPU", 0.0),
             "gpus": node["Resources"].get("GPU", 0.0)} for node in nodes]


def cluster_nodes(cfg: RunConfig) -> dict[str, Any]:
    """The cluster of ``flower.ray_address`` ({} for a local Ray), after checking that one ClientApp fits on it."""
    check_cuda_share(cfg)
    address = cfg.flower.ray_address
    if not address:
        return {}
    _answers(address)
    nodes = _alive_nodes(address)
    need = client_resources(cfg)
    if not any(n["cpus"] >= need["num_cpus"] and n["gpus"] >= need["num_gpus"] for n in nodes):
        have = ", ".join(f"{n['ip']}: {n['cpus']:g} CPU / {n['gpus']:g} GPU" for n in nodes) or "no live node"
        raise FedSSLError(f"no node of the Ray cluster at {address} has the {need['num_cpus']:g} CPU(s) and "
                          f"{need['num_gpus']:g} GPU(s) of one ClientApp ({have}); lower flower.client_cpus / "
                          "flower.client_gpus or add bigger workers (ray start --address=... --num-cpus=N --num-gpus=G)")
    return {"address": address, "nodes": nodes}


def describe(cluster: dict[str, Any]) -> str:
    """One line for flower.log: where the ClientApps run."""
    if not cluster:
        return "ClientApps on a Ray instance Flower started on this machine"
    nodes = cluster["nodes"]
    return (f"ClientApps on the Ray cluster at {cluster['address']}: {len(nodes)} node(s), "
            f"{sum(n['cpus'] for n in nodes):g} CPU(s), {sum(n['gpus'] for n in nodes):g} GPU(s) "
            f"({', '.join(n['ip'] for n in nodes)})")
