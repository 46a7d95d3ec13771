"""The table engine: collisionless hash tables, admission filters and sparse optimizers.

No gRPC and no sharding in here: what a table is, not where its rows live.
"""
