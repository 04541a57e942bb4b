"""The Flower engine: every method on Flower's Message API, in its simulation runtime or a real deployment.

- ``server_app.py`` / ``client_app.py``: the Flower app (``flwr run .``), thin;
- ``messages.py``: payloads <-> records, message types, bytes on the wire;
- ``server.py``: nodes, messages out and replies in within a timeout, the round runner;
- ``node.py``: a client on its own node (config, data, method, what it keeps);
- ``split.py``: MocoSFL's per-step exchange (forward / backward / sync messages);
- ``runs.py``: runs in simulation (``fedssl run --engine flower``) and deployment;
- ``deploy.py``: credentials, per-client data, SuperLink / SuperNode launchers.
"""
