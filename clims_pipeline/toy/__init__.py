"""The toy world: a procedural data set with exact masks and captions, its tiny CLIP and its preset."""
