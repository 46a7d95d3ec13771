"""Training data: columnar example batches, stable feature ids, and the MovieLens-100k loader.

Modules are imported directly (`monolith.data.batch`, `monolith.data.movielens`) so that
code needing only `Batch` does not pay for importing pyarrow.
"""
