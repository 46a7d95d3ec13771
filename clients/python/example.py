"""Scores three movies for one MovieLens user against a running model-serving.

    python clients/python/example.py --address 127.0.0.1:8500
"""

import argparse

from monolith_client import MonolithClient

parser = argparse.ArgumentParser()
parser.add_argument("--address", default="127.0.0.1:8500")
args = parser.parse_args()

with MonolithClient(args.address) as client:
    scores = client.score(
        user={"user_id": 196, "age": "45-49", "gender": "M", "occupation": "writer", "zip": "554"},
        candidates={
            "movie_id": [242, 302, 377],
            "genres": [["Comedy"], ["Crime", "Film-Noir", "Mystery", "Thriller"], ["Children's", "Comedy"]],
        },
    )
for movie, score in zip([242, 302, 377], scores):
    print(f"movie {movie}: {score:.3f}")
