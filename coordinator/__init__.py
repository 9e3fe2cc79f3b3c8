"""The ATOM coordinator: run config, scheduling, verification, aggregation, ledger, services."""

import os

# gRPC core logs an INFO line each time we spawn a node or daemon while its threads run
# ("skipping fork() handlers"); it is harmless and would clutter every demo.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
