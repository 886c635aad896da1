"""The stages of the voice agent: each turns one kind of data into another and is usable alone.

Stages never import `agent`; they own no threads or queues.
"""
