"""Webhooks: tell other systems about every state change of a job with a WEBHOOK file.

events.py   what is sent: the WEBHOOK file, the LOG tail, the POST body
outbox.py   where events wait: one file per event, written in batches off the event loop
send.py     one POST: URL parsing, credentials, which addresses may be reached, signing
engine.py   the listener on the store, ordered lanes per job and URL, retries, records
"""

from batchingest.webhooks.engine import Webhooks

__all__ = ["Webhooks"]
