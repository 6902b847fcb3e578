"""Rendezvous ports for the test's DDP jobs, chosen so two jobs can never share one.

A port from ``bind(("", 0))`` is an *ephemeral* port: it is free when asked for, but until the job's
rank 0 binds it, any other socket on the machine may be handed the same number (the other pytest
worker's DDP ranks open many). A rank that then reaches another job's store or gloo listener
joins the wrong job, and both jobs fail or wait forever. Ports here come from below the kernel's
ephemeral range, which no socket is ever handed unasked, from a block of their own for each
pytest-xdist worker, and never twice in a session.
"""

from __future__ import annotations

import itertools
import os
import socket

_BLOCK = 1000


def _first_port() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw")[2:]  # "gw3" -> 3; "" when not under xdist
    index = int(worker) + 1 if worker.isdigit() else 0
    ephemeral_low = 32768
    try:
        ephemeral_low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return max(1024, ephemeral_low - _BLOCK * (index + 1) - 2000)


_candidates = None


def free_port() -> int:
    """A port no other job of this test session uses, and that can be bound now."""
    global _candidates
    if _candidates is None:
        start = _first_port()
        offset = os.getpid() % _BLOCK  # two sessions on one machine start at different ports
        _candidates = itertools.chain(range(start + offset, start + _BLOCK), range(start, start + offset))
    for port in _candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free rendezvous port left in this pytest worker's block")
