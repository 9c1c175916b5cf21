"""What a run writes while it runs: ``metrics.csv`` every round, checkpoints, an incomplete summary.

A :class:`RunRecorder` is a round hook of the engine's server
(:attr:`fedml_progfed.engine.server.Server.round_hooks`): both runtimes call it
once per round, after the round's test. A write that fails (full disk, no
permission, read-only or lost mount) ends the run with one
:class:`~fedml_progfed.errors.WriteError` line naming the file and the checkpoint
``--resume`` continues from.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedml_progfed.config.schema import RunConfig
from fedml_progfed.engine import Client, Server
from fedml_progfed.report import write_summary_json
from fedml_progfed.report.metrics import MetricsFile
from fedml_progfed.runners.checkpoint import read_checkpoint, run_config, write_checkpoint, write_error

CLIENT_PREFIX = "client/"


class RunRecorder:
    """Appends the round's row, writes checkpoints every ``progfed_checkpoint_every`` rounds.

    Parameters
    ----------
    out
        The run folder.
    config
        The run's configuration (checkpoint frequency and retention).
    client
        The standalone simulator's client end, whose per-silo error-feedback residuals are
        client state a standalone checkpoint must keep; ``None`` in cross-silo runs (each
        client process holds its own).
    """

    def __init__(self, out: Path, config: RunConfig, client: Client | None = None) -> None:
        self.out = Path(out)
        self.every = config.progfed.checkpoint_every
        self.keep = config.progfed.checkpoint_keep
        self.client = client
        self.metrics = MetricsFile(self.out / "metrics.csv")
        self._config: dict | None = None

    def __call__(self, server: Server) -> None:
        try:
            self._record(server)
        except OSError as exc:
            raise write_error(self.out, exc, server.algorithm.total_rounds) from None

    def _record(self, server: Server) -> None:
        """The round's row, the checkpoint when one is due, the incomplete summary."""
        self.metrics.update(server.state.ledger.rows)
        done = server.state.round
        if self.every and (done % self.every == 0 or server.finished):
            tensors, meta = server.checkpoint()
            if self.client is not None:
                memories = self.client.memory_state()
                meta["clients"] = sorted(memories)
                for client, residuals in memories.items():
                    tensors.update({f"{CLIENT_PREFIX}{client}/{name}": t for name, t in residuals.items()})
            write_checkpoint(self.out, done, tensors, meta, self.keep, self._run_config())
        if not server.finished:
            self._write_incomplete_summary(server)

    def start(self, server: Server) -> None:
        """Say the run is under way before its first round ends: a kill at any moment leaves
        ``summary.json`` saying ``complete: false`` (a kill before the first row once left none)."""
        try:
            self._write_incomplete_summary(server)
        except OSError as exc:
            raise write_error(self.out, exc, server.algorithm.total_rounds) from None

    def _write_incomplete_summary(self, server: Server) -> None:
        write_summary_json(
            self.out / "summary.json",
            {"complete": False, "rounds_done": server.state.round, "total_rounds": server.algorithm.total_rounds},
        )

    def _run_config(self) -> dict | None:
        """The folder's ``config.yaml`` (written before the first round), which every checkpoint records.

        Read once: a resumed run keeps the configuration it started with, whatever
        ``FREE_ON_RESUME`` keys its command changed.
        """
        if self._config is None:
            self._config = run_config(self.out)
        return self._config

    def restore(self, server: Server, checkpoint: Path) -> None:
        """Continue a run from ``checkpoint``: server state, clients' residuals, the metrics file."""
        tensors, meta = read_checkpoint(checkpoint)
        # The simulator's silos kept what they were sent (it is the restored server model for every
        # tensor they hold unchanged); cross-silo clients restarted with nothing and get it all once.
        server.restore({k: v for k, v in tensors.items() if not k.startswith(CLIENT_PREFIX)}, meta,
                       clients_kept_their_copies=self.client is not None)
        if self.client is not None:
            self.client.hold(server.model.state_dict())
            memories: dict[int, dict[str, torch.Tensor]] = {int(c): {} for c in meta.get("clients", [])}
            for key, value in tensors.items():
                if key.startswith(CLIENT_PREFIX):
                    client, name = key[len(CLIENT_PREFIX):].split("/", 1)
                    memories[int(client)][name] = value
            self.client.load_memory_state(memories)
        try:
            self.metrics.update(server.state.ledger.rows)  # the checkpoint's rows: none after it, none twice
        except OSError as exc:
            raise write_error(self.out, exc, server.algorithm.total_rounds) from None
