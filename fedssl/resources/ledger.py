"""The ledger: one row per (round, client, kind) of what a client sent (bytes of the real tensors), held and
computed (a measured step's cost), summed up for the report; and numbers for humans.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from fedssl.errors import CheckpointError, FedSSLError
from fedssl.io import atomic_write_text
from fedssl.resources.memory import StepCost

UPLOAD = "upload"
DOWNLOAD = "download"
STEP_COST = "step_cost"
SERVER_STEP_COST = "server_step_cost"  # split methods: the server's part of a step
SERVER_ID = -1  # the ``client`` of the server's own rows (e.g. SERVER_STEP_COST): never counted as a client
REFERENCE_STEP_COST = "reference_step_cost"  # the client step of the method's reference (Method.reference_cost)


def tensor_bytes(t: Tensor) -> int:
    """Bytes of the tensor's elements: ``numel * element_size`` (what serialising it sends)."""
    return t.numel() * t.element_size()


def payload_bytes(payload: Mapping[str, Tensor] | Iterable[Tensor]) -> int:
    """Bytes of the real tensors in a message (a state dict or a list of tensors).

    Every entry is counted, even two that share storage: each is sent.
    Keys and framing overhead are not counted.
    """
    tensors = payload.values() if isinstance(payload, Mapping) else payload
    total = 0
    for t in tensors:
        if not isinstance(t, Tensor):
            raise TypeError(f"payload holds a {type(t).__name__}, expected only tensors")
        total += tensor_bytes(t)
    return total


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


@dataclass
class Ledger:
    """Per client and round: what a client held, computed and sent.

    One row per event: ``{"round", "client", "kind", **values}``. Rows of kind
    ``"upload"`` / ``"download"`` carry ``bytes``; rows of kind
    ``"step_cost"`` carry :meth:`StepCost.as_dict`.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)

    def record(self, *, round: int, client: int, kind: str, **values: float | int) -> None:  # noqa: A002
        """Append one row; values must be finite numbers."""
        if not kind:
            raise ValueError("kind must be a non-empty string")
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"ledger value {name}={value!r} must be a finite number")
        self.rows.append({"round": int(round), "client": int(client), "kind": kind, **values})

    def record_step_cost(self, *, round: int, client: int, cost: StepCost) -> None:  # noqa: A002
        """Append a ``"step_cost"`` row holding every field of ``cost``."""
        self.record(round=round, client=client, kind=STEP_COST, **cost.as_dict())

    def clients(self) -> list[int]:
        """Every client that appears in any row, sorted; the server's rows (``SERVER_ID``) are not a client's."""
        return sorted({row["client"] for row in self.rows if row["client"] != SERVER_ID})

    def optimizer_steps(self) -> int:
        """Local optimizer steps over the run, summed over every client's uploads (0 where none are recorded)."""
        return int(sum(row.get("steps", 0) for row in self.rows if row["kind"] == UPLOAD))

    def bytes_per_client(self) -> dict[int, dict[str, int]]:
        """Total bytes each client uploaded and downloaded over the run: ``{client: {"up", "down"}}``."""
        totals = {client: {"up": 0, "down": 0} for client in self.clients()}
        direction = {UPLOAD: "up", DOWNLOAD: "down"}
        for row in self.rows:
            if row["kind"] in direction and row["client"] != SERVER_ID:
                totals[row["client"]][direction[row["kind"]]] += int(row["bytes"])
        return totals

    def _step_values(self, name: str) -> list[float]:
        return [float(row[name]) for row in self.rows if row["kind"] == STEP_COST and name in row]

    def summary(self) -> dict[str, float]:
        """Per-client communication (mean / max over clients) and the memory / FLOP extremes."""
        per_client = list(self.bytes_per_client().values())
        up = [float(c["up"]) for c in per_client]
        down = [float(c["down"]) for c in per_client]
        both = [u + d for u, d in zip(up, down)]
        out: dict[str, float] = {
            "clients": float(len(per_client)),
            "up_bytes_mean": _mean(up),
            "up_bytes_max": max(up, default=0.0),
            "down_bytes_mean": _mean(down),
            "down_bytes_max": max(down, default=0.0),
            "comm_bytes_mean": _mean(both),
            "comm_bytes_max": max(both, default=0.0),
            "comm_bytes_total": float(sum(both)),
        }
        if any(row["kind"] == STEP_COST for row in self.rows):
            out.update(
                {
                    "peak_training_bytes_max": max(self._step_values("peak_training_bytes"), default=0.0),
                    "estimated_bytes_max": max(self._step_values("estimated_bytes"), default=0.0),
                    "activation_bytes_max": max(self._step_values("activation_bytes"), default=0.0),
                    "flops_per_image_mean": _mean(self._step_values("flops_per_image")),
                    "flops_per_image_max": max(self._step_values("flops_per_image"), default=0.0),
                }
            )
        return out

    def to_jsonl(self, path: Path) -> None:
        """Write one JSON object per row, atomically; nothing is written if a row cannot be serialised."""
        text = "".join(json.dumps(row, allow_nan=False) + "\n" for row in self.rows)
        atomic_write_text(path, text)

    @classmethod
    def from_jsonl(cls, path: Path) -> Ledger:
        """Read a ledger written by :meth:`to_jsonl`."""
        rows: list[dict[str, Any]] = []
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as err:
            raise FedSSLError(f"cannot read ledger {path}: {err.strerror}; check the path") from err
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise FedSSLError(f"ledger {path} line {number} is not valid JSON; delete the file or re-run") from err
            _check_row(row, f"ledger {path} line {number}")
            rows.append(row)
        return cls(rows)

    def state_dict(self) -> dict[str, Any]:
        """A copy of the rows, for checkpoints."""
        return {"rows": [dict(row) for row in self.rows]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the rows by those of :meth:`state_dict` (validated)."""
        rows = state.get("rows") if isinstance(state, Mapping) else None
        if not isinstance(rows, list):
            raise CheckpointError("checkpoint ledger has no 'rows' list; the checkpoint is corrupt or from another version")
        for row in rows:
            _check_row(row, "checkpoint ledger")
        self.rows = [dict(row) for row in rows]


def _check_row(row: object, where: str) -> None:
    if not isinstance(row, dict) or not {"round", "client", "kind"} <= row.keys():
        raise CheckpointError(f"{where}: a row lacks round/client/kind; the file is corrupt or from another version")


def _human(n: float, base: float, units: Sequence[str]) -> str:
    value = float(n)
    for unit in units[:-1]:
        if abs(value) < base:
            return f"{value:.0f} {unit}" if unit == units[0] else f"{value:.1f} {unit}"
        value /= base
    return f"{value:.1f} {units[-1]}"


def human_bytes(n: float) -> str:
    """Binary units: ``human_bytes(1258291) == "1.2 MiB"``."""
    return _human(n, 1024.0, ("B", "KiB", "MiB", "GiB", "TiB", "PiB"))


def human_flops(n: float) -> str:
    """Decimal units: ``human_flops(3.4e6) == "3.4 MFLOP"``."""
    return _human(n, 1000.0, ("FLOP", "kFLOP", "MFLOP", "GFLOP", "TFLOP", "PFLOP", "EFLOP"))
