"""The Flower engine: every method on Flower's Message API, in its simulation runtime or a real deployment.

- ``server_app.py`` / ``client_app.py``: the Flower app (``flwr run .``), thin;
- ``messages.py``: payloads <-> records, message types, bytes on the wire;
- ``link.py``: messages between the server and the nodes by client, replies within a timeout;
- ``server.py``: which runs Flower takes, and the rounds over the Grid (the shared round drivers with
  Flower's exchanges);
- ``node.py``: a client on its own node (config, data, client role, what it keeps);
- ``split.py``: the split protocol's tensors <-> forward / backward / sync / average messages;
- ``partitions.py``: a client's own data folder;
- ``runs.py``: runs in simulation (``fedssl run --engine flower``) and deployment;
- ``deploy.py``: credentials, per-client data, SuperLink / SuperNode launchers.
"""
