"""Websocket streaming service (DESIGN §5): protocol, batching scheduler, server and client.

``streamssm serve`` runs a checkpoint in recurrent mode for many concurrent streams;
``streamssm stream`` sends a file to it. See ``service/PROTOCOL.md`` for the wire protocol.
"""
