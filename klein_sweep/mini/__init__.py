"""The mini world: a procedural world of small creatures, a feature network and a pre-trained
miniature Flux2KleinPipeline that make the whole mission run meaningfully on a CPU.

    world.py     creatures, captions, identities (deterministic from a seed)
    features.py  the feature network: attribute heads + identity embedding, for the metrics
    build.py     `python -m klein_sweep.mini.build`: trains the VAE, the transformer and the
                 feature network, writes the weights into klein_sweep/mini/weights/
"""
