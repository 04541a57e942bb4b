"""What travels in a Flower message, and what a message weighs on the wire.

fedssl payloads (``{name: tensor}``) become ``ArrayRecord`` s and back; the small
things that go with them (round, client, the run's config) a ``ConfigRecord``; a
client's numbers a ``MetricRecord``. Message types (``MessageType``): the
round-based methods use Flower's ``train``; a node says who it is on
``query.hello``; the per-step exchange of split methods uses custom actions ``train.forward``,
``train.backward``, ``train.sync`` and ``train.average``.

Wire size: Flower (1.41) serialises a message as a tree of content-addressed
objects (Message -> RecordDict -> records -> Array -> ArrayChunk) and pushes each
object's deflated bytes. :func:`wire_bytes` is the sum of those bytes: what the
deployment runtime sends for the message, before HTTP/TLS framing (measured apart,
see README "Flower"). In simulation nothing is serialised; the same figure says
what a deployment would send.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedssl.methods.base import Payload

# message types (``<category>.<action>``, see flwr.app.metadata.validate_message_type)
HELLO = "query.hello"  # server -> node: who are you (partition, data); also hands over the run's config
TRAIN = "train"  # a round of a round-based method: download -> local training -> upload
FORWARD = "train.forward"  # split step, part 1: the client's activations at the cut go up
BACKWARD = "train.backward"  # split step, part 2: the gradient slice comes down; the client updates
SYNC = "train.sync"  # split round end: the client-nets go up to be averaged
AVERAGE = "train.average"  # split round end: their average comes down to the clients whose nets went into it

# record names inside a message's RecordDict
TASK = "task"  # ConfigRecord: round, client, step ..., config-hash (+ config, the first time a node is addressed)
PAYLOAD = "payload"  # ArrayRecord: the download
UPLOAD = "upload"  # ArrayRecord: the upload
RESULT = "result"  # MetricRecord: num-samples and the client's local metrics
NODE = "node"  # ConfigRecord: a node's answer to hello


INDEX, DATA = "index", "data"  # the two Arrays of a payload's ArrayRecord


def to_record(payload: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """{name: tensor} -> an ArrayRecord of two Arrays: every tensor's bytes end to end (``data``), and the
    names, dtypes and shapes (``index``, JSON). Exact; keys and order kept; 0-d tensors stay 0-d.

    Packed rather than one Array per tensor: a deployment moves each Array (and each of its chunks)
    as its own object, one HTTP request per object on every hop (ServerApp -> SuperLink -> SuperNode
    -> ClientApp and back), so the demo model's 155 tensors cost over 300 requests per hop; packed, 5.
    """
    arrays = [value.detach().cpu().contiguous().numpy() for value in payload.values()]
    index = [[key, array.dtype.str, list(array.shape)] for key, array in zip(payload, arrays)]
    data = (np.concatenate([array.reshape(-1).view(np.uint8) for array in arrays]) if arrays
            else np.zeros(0, dtype=np.uint8))
    return ArrayRecord({INDEX: _array(np.frombuffer(json.dumps(index).encode(), dtype=np.uint8).copy()),
                        DATA: _array(data)})


def _array(values: np.ndarray):  # -> flwr.app.Array
    from flwr.app import Array

    return Array(values)


def from_record(record: ArrayRecord) -> Payload:
    """ArrayRecord (of :func:`to_record`) -> {name: tensor} (writable CPU tensors)."""
    index = json.loads(record[INDEX].numpy().tobytes())
    data = record[DATA].numpy()
    out: Payload = {}
    at = 0
    for key, dtype, shape in index:
        kind = np.dtype(dtype)
        size = int(np.prod(shape, dtype=np.int64)) * kind.itemsize
        if at + size > data.size:
            raise ValueError(f"the record's data ends before its tensor {key!r}")
        out[key] = torch.from_numpy(data[at:at + size].view(kind).reshape(shape).copy())
        at += size
    if at != data.size:
        raise ValueError(f"the record holds {data.size - at} bytes more than its index names")
    return out


def content(*, task: Mapping[str, object] | None = None, **records: ArrayRecord | ConfigRecord | MetricRecord
            ) -> RecordDict:
    """A message's content: the ``task`` ConfigRecord (if any) and the given records."""
    out = RecordDict()
    if task is not None:
        out[TASK] = ConfigRecord(dict(task))  # type: ignore[arg-type]
    for name, record in records.items():
        out[name] = record
    return out


def metrics_record(values: Mapping[str, float | int]) -> MetricRecord:
    """Numbers (loss, steps, images ...) as a MetricRecord; ints stay ints."""
    return MetricRecord({k: (int(v) if isinstance(v, (bool, np.integer)) else v) for k, v in values.items()})


def wire_bytes(message: Message) -> int:
    """Bytes of the deflated objects Flower pushes for ``message`` (each distinct object once)."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())
