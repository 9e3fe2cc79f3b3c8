"""The ATOM coordinator, one folder per concept: ``run`` (the loop that leases work and makes
versions), ``verify`` (from a node's reply to its verdict), ``accounting`` (credits, receipts,
statements), ``ledger``, ``aggregators``, ``services`` (what it serves: gRPC, status, SuperLink,
PKI); ``cli``, ``config``, ``demo`` and ``rundir`` at the top."""

import os

# gRPC core logs an INFO line each time we spawn a node or daemon while its threads run
# ("skipping fork() handlers"); it is harmless and would clutter every demo.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
