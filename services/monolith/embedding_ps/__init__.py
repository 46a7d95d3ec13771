"""The embedding parameter server: one shard of every slot's table, served over gRPC."""
