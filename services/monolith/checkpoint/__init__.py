"""Checkpoint storage: manifests, row files and dense snapshots on any fsspec file system.

No model knowledge and no network protocol here: the controller exports rows from the
parameter servers and hands them to a `CheckpointWriter`; a restore reads them back
through `restore_plan`, which routes every row to its owner among any number of shards.
"""
