"""Models: plain torch + transformers, no Spark (the encoder; later the predictor and training loop)."""
