"""The embedding parameter server: one shard of every embedding table, served over gRPC."""
