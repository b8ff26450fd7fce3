"""On-device SDK: encrypted store, local embedding, DP training, local scoring, Flower ClientApp."""
