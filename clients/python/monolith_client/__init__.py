"""A small Python client for monolith's Predict API (TF Serving's PredictionService).

    from monolith_client import MonolithClient

    with MonolithClient("127.0.0.1:8500") as client:
        scores = client.score(
            user={"user_id": 196, "age": 49, "gender": "M", "occupation": "writer", "zip": "554"},
            candidates={"movie_id": [242, 302, 377], "genres": [["Comedy"], ["Crime", "Drama"], ["Action"]]},
        )
"""

from monolith_client.client import MonolithClient, PredictError

__all__ = ["MonolithClient", "PredictError"]
