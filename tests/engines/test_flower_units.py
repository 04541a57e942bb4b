"""The Flower engine's pieces without a Flower runtime: records, wire sizes, the shared round's checks,
what a layer-wise client keeps, MocoSFL's device-side client, credentials and client data folders."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import torch
from flwr.app import Array, Context, Message, RecordDict

from fedssl.aggregation import check_upload, weighted_average
from fedssl.data.datasets import load_split
from fedssl.data.partition import partition
from fedssl.engines.flower import node
from fedssl.engines.flower.deploy import supernode_command
from fedssl.engines.flower.messages import content, from_record, to_record, wire_bytes
from fedssl.engines.local import SilentObserver, load_federation
from fedssl.engines.rounds import Reply, federated_round
from fedssl.errors import FedSSLError
from fedssl.methods.base import ClientResult, MethodContext, Payload
from fedssl.methods.fedavg import FedMoCo
from fedssl.methods.layerwise import LWFedSSL
from fedssl.methods.mocosfl import MocoSFL
from fedssl.methods.split import StepTask
from fedssl.resources import Ledger, payload_bytes
from tests.helpers import running, tiny_config


@pytest.fixture(autouse=True)
def _task_identity():
    """Flower stamps new messages with the identity of the running task: give these tests one."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def test_records_round_trip_exactly_and_weigh_what_they_hold() -> None:
    payload = {"w": torch.randn(64, 32), "b": torch.randn(32), "n": torch.tensor(7), "i": torch.arange(5)}
    back = from_record(to_record(payload))
    assert list(back) == list(payload)
    for key, value in payload.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape and torch.equal(back[key], value)
    message = Message(content(task={"round": 0}, payload=to_record(payload)), dst_node_id=1, message_type="train")
    size = wire_bytes(message)
    assert payload_bytes(payload) < size < payload_bytes(payload) + 4096  # tensors + npy headers + object headers
    twice = Message(content(a=to_record(payload), b=to_record(payload)), dst_node_id=1, message_type="train")
    assert wire_bytes(twice) < 1.2 * size  # Flower sends one copy of identical objects


def test_a_payload_is_one_array_and_a_damaged_record_is_refused() -> None:
    payload = {f"t{i}": torch.randn(4, 3) for i in range(50)} | {"flag": torch.tensor(True)}
    record = to_record(payload)
    assert len(record) == 2  # one Array of bytes + its index, however many tensors (Flower moves each Array apart)
    assert from_record(to_record({})) == {}
    data = record["data"].numpy()
    record["data"] = Array(data[:-1].copy())
    with pytest.raises(ValueError, match="ends before"):
        from_record(record)


def test_supernode_commands_and_the_fleet_polling_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr.supernode.start_client_internal as loop

    from fedssl.engines.flower.supernode import cap_fleet_polling

    where = {"superlink": "127.0.0.1:9", "partition_id": 0, "num_partitions": 2, "data_dir": tmp_path}
    ours = supernode_command(**where)
    assert ours[1:5] == ["-m", "fedssl.engines.flower.supernode", "--worker", "--fleet-poll"] and "--" in ours
    assert supernode_command(**where, per_message=True, fleet_poll=None)[0].endswith("flower-supernode")
    with pytest.raises(FedSSLError, match="fleet-poll"):
        supernode_command(**where, fleet_poll=0)
    monkeypatch.setattr(loop, "time", loop.time)  # put Flower's own back after the test
    cap_fleet_polling(0.01)
    began = time.perf_counter()
    loop.time.sleep(3)  # Flower's wait when no message came
    assert time.perf_counter() - began < 1 and loop.time.time() > 0



def test_a_supernode_that_joined_and_left_is_started_again_one_that_never_joined_ends(tmp_path: Path) -> None:
    """``supervise``: the first SuperNode says it joined and leaves (the SuperLink forgot it): started again; the
    second never joins (say, a refused key): its exit status ends the supervisor."""
    from fedssl.engines.flower import supernode

    starts = tmp_path / "starts"
    child = ("import pathlib, sys; p = pathlib.Path(sys.argv[1]); n = len(p.read_text()) if p.exists() else 0; "
             "p.write_text('x' * (n + 1)); print('SuperNode ID: 7' if n == 0 else 'Failed to activate SuperNode.'); "
             "sys.exit(0 if n == 0 else 5)")
    assert supernode.supervise([sys.executable, "-c", child, str(starts)]) == 5
    assert starts.read_text() == "xx"


def test_the_worker_ends_when_the_process_that_started_it_is_gone(tmp_path: Path) -> None:
    """A worker whose parent (``fedssl deploy supernode``) dies ends by itself, also while its HTTP client retries a
    SuperNode that is gone (nothing listens at its Runtime API port here)."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pid_file = tmp_path / "worker.pid"
    # the bash process starts the worker, says its pid and exits: the worker's parent is gone
    subprocess.run(["bash", "-c", f"{sys.executable} -m fedssl.engines.flower.worker --runtime-api-address "
                    f"127.0.0.1:{port} --parent-pid $$ >{tmp_path / 'worker.log'} 2>&1 & echo $! >{pid_file}; sleep 8"],
                   check=True, timeout=60)
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and running(pid):
        time.sleep(0.2)
    assert not running(pid), (tmp_path / "worker.log").read_text()[-2000:]
    assert "is gone; stopping" in (tmp_path / "worker.log").read_text()


def test_object_pulls_retry_at_once_not_after_flowers_one_second(monkeypatch: pytest.MonkeyPatch) -> None:
    """An object that is not there yet (the SuperNode hands a task over before it holds the objects) is asked for
    again after 0.01 s, doubling to 0.1 s, in each of the three places Flower pulls objects; Flower waits 1 s, 2 s."""
    import importlib

    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    from fedssl.engines.flower.pulls import PATCHED, cap_pull_backoff

    modules = [(importlib.import_module(module), name) for module, name in PATCHED]
    for module, name in modules:  # each name still exists in this Flower (an upgrade that renames one fails here)
        monkeypatch.setattr(module, name, getattr(module, name))  # Flower's own back after the test
    cap_pull_backoff()
    cap_pull_backoff()  # twice is once: the original is re-capped, not wrapped twice
    tries: list[float] = []

    def pull(object_id: str) -> bytes:
        tries.append(time.perf_counter())
        if len(tries) < 4:
            raise ObjectUnavailableError(object_id)
        return b"content"

    import flwr.supernode.start_client_internal as loop

    assert loop.pull_objects(["id"], pull_object_fn=pull) == {"id": b"content"}
    assert tries[-1] - tries[0] < 0.8  # three waits of ~0.01 + 0.02 + 0.04 s (Flower's own: 1 + 2 + 4 s)
    for module, name in modules:
        capped = getattr(module, name)
        assert capped.keywords == {"initial_backoff": 0.01, "backoff_cap": 0.1, "max_tries_per_object": None}
        assert not hasattr(capped.func, "func")

def test_check_upload_names_what_is_wrong() -> None:
    expected = {"w": torch.zeros(3, 2), "n": torch.zeros((), dtype=torch.long)}
    assert check_upload({"w": torch.ones(3, 2), "n": torch.tensor(1)}, expected, 10) is None
    assert "NaN" in check_upload({"w": torch.full((3, 2), math.nan), "n": torch.tensor(1)}, expected, 10)
    assert "shape" in check_upload({"w": torch.ones(5), "n": torch.tensor(1)}, expected, 10)
    assert "missing" in check_upload({"w": torch.ones(3, 2)}, expected, 10)
    assert "sample count" in check_upload({"w": torch.ones(3, 2), "n": torch.tensor(1)}, expected, -1)


def test_the_shared_round_never_averages_failed_or_rejected_replies() -> None:
    """A fake engine's exchange: client 1 never answers, client 2 sends NaN; the average is of 0 and 3 only."""
    cfg = tiny_config("clients=4", "local_steps=1", "batch_size=8")
    fed = load_federation(cfg, pooled=False)
    method = FedMoCo(MethodContext(cfg, fed.train.info, torch.device("cpu")))
    honest: dict[int, ClientResult] = {}

    def exchange(round_index: int, sends: Iterable[tuple[int, Payload]]) -> Iterator[Reply]:
        for client, payload in sends:
            result = method.client.train(payload, fed.client_data(client), round_index=round_index, client_id=client)
            if client == 1:
                yield Reply(client, None, "no reply within 1 s", wire_down=100)
                continue
            if client == 2:
                result.upload = {k: torch.full_like(v, math.nan) if v.is_floating_point() else v
                                 for k, v in result.upload.items()}
            else:
                honest[client] = result
            yield Reply(client, result, wire_down=100, wire_up=90)

    ledger = Ledger(rows=[])
    row = federated_round(method, cfg, 0, 4, exchange, ledger, SilentObserver())
    assert (row["failed"], row["rejected"], row["wire_down"], row["wire_up"]) == (1, 1, 400, 270)
    want = weighted_average([honest[0].upload, honest[3].upload], [honest[0].num_samples, honest[3].num_samples])
    got = method.global_model.exchanged_state()
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    uploads = [r for r in ledger.rows if r["kind"] == "upload"]
    assert [r.get("rejected", 0) for r in uploads] == [0, 1, 0] and all("wire_bytes" in r for r in ledger.rows)


def _staged(cfg):
    fed = load_federation(cfg, pooled=False)
    return fed, LWFedSSL(MethodContext(cfg, fed.train.info, torch.device("cpu")))


def test_a_layerwise_client_keeps_its_frozen_layers_and_never_reads_the_server() -> None:
    """Flower's client: only the client side of the method (``build_client``), its frozen layers from its own
    state (a node's ``context.state``); the same uploads as the clients the in-process engine simulates."""
    cfg = tiny_config("method=lw-fedssl", "rounds=4", "local_steps=1", "batch_size=8", "clients=2",
                      "model.blocks_per_stage=[1,1]")
    fed, server = _staged(cfg)
    device = LWFedSSL.build_client(MethodContext(cfg, fed.train.info, torch.device("cpu")))  # no server state
    held: Payload = {}
    for r in range(4):
        payload = server.download(r, 0)
        device.kept = {0: held} if held else {}  # what the node restores from its state
        result = device.train(payload, fed.client_data(0), round_index=r, client_id=0)
        held = from_record(to_record(device.kept.get(0, {})))  # ... and stores after the message
        ref = server.client.train(payload, fed.client_data(0), round_index=r, client_id=0)  # in-process
        for key in result.upload:
            assert torch.equal(result.upload[key], ref.upload[key]), (r, key)
        server.aggregate(r, [result])
    stage = server.schedule.at_round(3)
    assert held and all(k.startswith(tuple(f"encoder.backbone.layers.{i}." for i in stage.frozen)) for k in held)
    assert set(server.download(3, 0)) == set(server.global_model.exchanged_state())  # frozen layers not re-sent
    server.client_lost(0)
    assert set(server.download(3, 0)) > set(server.global_model.exchanged_state())  # ... until the client is lost
    device.kept = {}  # a node that lost its state
    with pytest.raises(ValueError, match="holds no copy of the frozen layers"):
        device.train(server.global_model.exchanged_state(), fed.client_data(0), round_index=3, client_id=0)


def test_mocosfl_device_client_does_the_methods_own_step() -> None:
    """One step of client 1 on its own device (forward message, then backward message, no graph kept between
    them) equals the same client's step among the stacked clients the in-process engine simulates."""
    cfg = tiny_config("method=mocosfl", "ssl.temperature=0.1", "split.sync_every=2", "split.client_batch=2")
    data = load_split("synthetic", "train", image_size=16, synthetic_size=32)
    parts = [data.subset(p) for p in partition(data.labels.numpy(), cfg.clients, "iid", seed=0)]
    ctx = MethodContext(cfg, data.info, torch.device("cpu"))
    method = MocoSFL(ctx)
    method.clients.use_data(parts.__getitem__)
    client = MocoSFL.build_clients(ctx, [1])
    client.use_data(lambda _: parts[1])
    task = StepTask(0, 0, torch.tensor([1]), torch.tensor([0]))
    query = client.forward(task)["query"]
    assert query.shape[:2] == (1, 2) and not query.requires_grad
    grad = {"query": torch.randn_like(query)}
    client.backward(StepTask(0, 0, torch.tensor([1]), torch.tensor([0])), grad)  # another task object: recomputed
    # the same step among every client, all of them in one call
    every = StepTask(0, 0, torch.arange(cfg.clients), torch.zeros(cfg.clients, dtype=torch.long))
    ref = method.clients.forward(every)
    ref_query = ref["query"][1:2]
    assert torch.allclose(ref_query, query)
    method.clients.backward(every, {"query": torch.zeros_like(ref["query"]).index_copy(0, torch.tensor([1]),
                                                                                        grad["query"])})
    mine = client.upload(torch.tensor([1]))
    for name, t in method.clients.upload(torch.tensor([1])).items():
        assert torch.allclose(mine[name], t), name


def _context(node_config: dict, state: RecordDict | None = None) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=state or RecordDict(), run_config={})


def test_a_node_caches_the_config_and_refuses_a_message_of_another_run(tmp_path: Path) -> None:
    from fedssl.config import config_hash, dumps_toml, to_dict

    cfg = tiny_config("clients=2")
    text, digest = dumps_toml(to_dict(cfg)), config_hash(cfg)
    ctx = _context({"partition-id": 0, "num-partitions": 2})
    first = Message(content(task={"config-hash": digest, "config": text}), dst_node_id=7, message_type="train")
    assert node.run_config(first, ctx) == cfg
    later = Message(content(task={"config-hash": digest}), dst_node_id=7, message_type="train")
    assert node.run_config(later, ctx) == cfg  # from the node's state
    other = Message(content(task={"config-hash": "0" * 16}), dst_node_id=7, message_type="train")
    with pytest.raises(Exception, match="no config for this run"):
        node.run_config(other, ctx)
    with pytest.raises(Exception, match="no partition-id"):
        node.node_setup(_context({}))


def test_partition_folders_hold_only_their_client_and_serve_only_matching_runs(tmp_path: Path) -> None:
    from fedssl.engines.flower.deploy import check_partition_dir, export_partitions

    cfg = tiny_config("clients=3", "partition=dirichlet")
    folders = export_partitions(cfg, tmp_path / "data")
    fed = load_federation(cfg, pooled=False)
    for i, folder in enumerate(folders):
        assert sorted(p.name for p in folder.iterdir()) == ["images.npy", "partition.json"]
        setup = node.NodeSetup(i, 3, str(folder))
        data = node.client_data(cfg, setup)
        assert torch.equal(data.images, fed.client_data(i).images) and bool((data.labels == -1).all())
        assert json.loads((folder / "partition.json").read_text())["digest"] == node.digest(data.images)
    with pytest.raises(Exception, match="holds partition 1 of 3, not 0 of 3"):
        check_partition_dir(folders[1], 0, 3)
    with pytest.raises(Exception, match="another partitioning"):
        node.client_data(tiny_config("clients=3", "partition=iid"), node.NodeSetup(0, 3, str(folders[0])))
    with pytest.raises(Exception, match="holds no client partition"):
        check_partition_dir(tmp_path / "nothing", 0, 3)


def test_credentials_are_a_ca_a_server_certificate_and_openssh_node_keys(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    from fedssl.engines.flower.deploy import make_credentials

    paths = make_credentials(tmp_path, hosts=("127.0.0.1", "link.example"), supernodes=2)
    ca = x509.load_pem_x509_certificate(paths["ca_cert"].read_bytes())
    server = x509.load_pem_x509_certificate(paths["server_cert"].read_bytes())
    assert server.issuer == ca.subject
    ca.public_key().verify(server.signature, server.tbs_certificate_bytes,
                           __import__("cryptography.hazmat.primitives.asymmetric.padding",
                                      fromlist=["PKCS1v15"]).PKCS1v15(), server.signature_hash_algorithm)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "link.example" in sans.get_values_for_type(x509.DNSName)
    for i in range(2):
        private = load_ssh_private_key(paths[f"supernode_{i}"].read_bytes(), None)
        public = load_ssh_public_key((tmp_path / f"supernode-{i}.pub").read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert private.public_key().public_numbers() == public.public_numbers()
    assert oct(paths["server_key"].stat().st_mode)[-3:] == "600"


def test_deploy_commands_fail_clearly_before_starting_flower(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from fedssl.cli import main

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    from fedssl.engines.flower.deploy import export_partitions

    export_partitions(tiny_config("clients=2"), tmp_path / "data")
    node = ["deploy", "supernode", "--partition-id", "0", "--num-partitions", "2"]
    assert main([*node, "--superlink", "127.0.0.1:9", "--data-dir", str(tmp_path / "missing")]) == 2
    assert "holds no client partition" in capsys.readouterr().err
    assert main([*node, "--superlink", "127.0.0.1:1", "--data-dir", str(tmp_path / "data" / "partition-0")]) == 2
    assert "cannot reach the SuperLink at 127.0.0.1:1" in capsys.readouterr().err
    assert main(["deploy", "superlink", "--auth"]) == 2
    assert "needs TLS" in capsys.readouterr().err
    assert main(["deploy", "federation", "x", "--superlink", "h:1", "--certs", str(tmp_path / "nocerts")]) == 2
    assert "lacks ca.crt" in capsys.readouterr().err
    assert main(["deploy", "federation", "x", "--superlink", "127.0.0.1:9093"]) == 0
    assert 'address = "127.0.0.1:9093"' in (tmp_path / "flwr-home" / "config.toml").read_text()
