"""Imported at start-up by the tests' subprocesses (``helpers.processes.revcol_env`` puts this folder on PYTHONPATH).

Logs every attempt to reach the network (name look-ups, IP connections, urllib/http requests) to the
file named by REVCOL_NETWORK_LOG, so a test can assert that a command tried none.
"""

import os
import sys

_LOG = os.environ.get("REVCOL_NETWORK_LOG")
_EVENTS = {"socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex", "urllib.Request"}


def _hook(event, args):
    if event in _EVENTS or event == "http.client.connect" or (event == "socket.connect" and isinstance(args[1], tuple)):
        with open(_LOG, "a") as log:
            log.write(f"{event} {args!r:.200}\n")


if _LOG:
    sys.addaudithook(_hook)
