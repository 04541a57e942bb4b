"""The Flower ServerApp (``[tool.flwr.app.components] serverapp``): the run config in, the run out.

Everything it does is ``fedssl.engines.flower.runs.serve``: read the run to do from the
app's run config (``config`` / ``set`` / ``out`` / ``resume``), then run the ordinary
fedssl loop with its rounds sent through the Grid.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedssl.engines.flower.pulls import cap_pull_backoff
from fedssl.engines.flower.runs import serve

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cap_pull_backoff()  # a reply's objects are pulled as soon as they are there, not after a 1 s wait
    serve(grid, context.run_config)
