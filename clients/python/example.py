"""Scores three movies for one MovieLens user against a running model-serving.

    python clients/python/example.py --address 127.0.0.1:8500
    python clients/python/example.py --address 127.0.0.1:8500 --tls-ca tls.crt --tls-server-name localhost
"""

import argparse

from monolith_client import MonolithClient

parser = argparse.ArgumentParser()
parser.add_argument("--address", default="127.0.0.1:8500")
parser.add_argument("--tls-ca", default=None, help="PEM certificate to trust: call model-serving over TLS")
parser.add_argument("--tls-server-name", default=None, help="the name on model-serving's certificate, if not the host")
args = parser.parse_args()

with MonolithClient(args.address, tls_ca=args.tls_ca, tls_server_name=args.tls_server_name) as client:
    scores = client.score(
        user={"user_id": 196, "age": "45-49", "gender": "M", "occupation": "writer", "zip": "554"},
        candidates={
            "movie_id": [242, 302, 377],
            "genres": [["Comedy"], ["Crime", "Film-Noir", "Mystery", "Thriller"], ["Children's", "Comedy"]],
        },
    )
for movie, score in zip([242, 302, 377], scores):
    print(f"movie {movie}: {score:.3f}")
